import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax
import pytest
from jax._src import lru_cache

# Implicit rank promotion is a bug in our code. Strict *dtype* promotion is applied
# per test (`strict_dtypes`) around our own math: optax's AdamW needs standard rules.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def strict_dtypes():
  with jax.numpy_dtype_promotion("strict"):
    yield


_TRACES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: _TRACES.append(kw.get("fun_name", event))
    if event == "/jax/core/compile/jaxpr_trace_duration" else None)


@pytest.fixture
def traces() -> list[str]:
  """The function name of every jaxpr trace (one per compilation of a jitted function)."""
  _TRACES.clear()
  yield _TRACES


def _atomic_cache_put(self, key: str, value: bytes) -> None:
  """JAX's file cache writes an entry in place; with two workers on one directory the
  other could read it half written. Write it aside and rename it into place instead."""
  path = self.path / f"{key}{lru_cache._CACHE_SUFFIX}"
  if path.exists():
    return
  tmp = self.path / f".{key}.{os.getpid()}.tmp"
  tmp.write_bytes(value)
  os.replace(tmp, path)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory, worker_id):
  """Share compiled programs between tests that build the same step more than once.

  One directory per pytest session: under xdist the workers' base temp dirs share a parent
  that is new for each session, so both workers reuse each other's programs, and no entry
  outlives the session's own temp dir or reaches another session."""
  if worker_id == "master":
    cache = tmp_path_factory.mktemp("jax_cache")
  else:
    cache = tmp_path_factory.getbasetemp().parent / "jax_cache"
    cache.mkdir(exist_ok=True)
  # Eviction off (max size -1, the default): the unlocked put below is then all there is.
  assert jax.config.jax_compilation_cache_max_size == -1
  lru_cache.LRUCache.put = _atomic_cache_put
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield


SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


# ----------------------------------------------------------------------------- shared helpers
# Plain functions (import them with `from conftest import ...`): the input shape and class
# count of each named dataset, and a config's model built as the trainer builds it.

SHAPES = {"digits": ((8, 8, 1), 10), "mnist": ((28, 28, 1), 10),
          "fashion_mnist": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10),
          "cifar100": ((32, 32, 3), 100), "tiny_imagenet": ((64, 64, 3), 200)}


def build(cfg, input_shape=None, num_classes=None):
  """(resolved compute, model) of a RunConfig, for its dataset's shapes unless given."""
  from noprop_jax import trainer

  shape, m = SHAPES.get(cfg.data.dataset, (None, None))
  compute = trainer.resolve_compute(cfg)
  return compute, trainer.build_model(cfg, input_shape or shape, num_classes or m, compute)
