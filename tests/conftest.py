import contextlib
import dataclasses
import os
import sys

# The suite is bound by XLA:CPU compiling training steps, not by running them. Without
# LLVM's optimisation and with XLA's older (simpler) fusion emitters, a step compiles with
# about a quarter of the CPU time and runs somewhat slower: the tests check values, not
# speed. The subprocesses the tests start inherit these flags. To run the tests as users'
# programs are compiled, set XLA_FLAGS yourself, e.g. XLA_FLAGS=--xla_cpu_multi_thread_eigen=true:
# the tests are written to pass both ways.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
# On a GPU or TPU: float32 matmuls and convolutions in full float32 (by default they run as
# TF32 on recent NVIDIA GPUs and as one bfloat16 pass on TPU, far coarser than the tests'
# float32 tolerances), and device memory allocated as needed (by default each process
# takes 75% of it at start: two test workers, and the processes tests start, would not
# fit). No effect on a CPU. The processes the tests start inherit both.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from noprop_jax import host_memory  # noqa: E402

host_memory.keep_host_memory()  # as the scripts do: on a CPU, before JAX computes anything

import chex  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

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
  """The function name of every jaxpr trace (one per compilation of a jitted function), of
  every program: for the checks that *nothing* compiles (an epoch, an evaluation, more
  epochs). `counted_method` counts one method's own functions (chex.assert_max_traces)."""
  _TRACES.clear()
  yield _TRACES


@pytest.fixture(scope="session")
def digits():
  """The digits dataset (`data.load("digits")`), loaded once per test process (xdist
  worker) when a test first asks for it. Shared: read it, never write into its arrays."""
  from noprop_jax import data

  return data.load("digits")


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
  # Both workers may write the same entry at once; a reader of a half-written entry gets
  # a read error, which JAX reports as a warning and answers by compiling (never wrong).
  # The processes the tests start (scripts, a notebook's kernel, simulated hosts) read
  # the same settings from the environment, so a resumed run reuses the first's programs.
  settings = {"jax_compilation_cache_dir": str(cache),
              "jax_persistent_cache_min_compile_time_secs": 0.5,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)
  yield


SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


# ----------------------------------------------------------------------------- shared helpers
# Plain functions (import them with `from conftest import ...`): the input shape and class
# count of each named dataset, a config's model built as the trainer builds it, the
# library's methods, trace counting (chex), simulated kills, and tree comparison (chex).

SHAPES = {"digits": ((8, 8, 1), 10), "mnist": ((28, 28, 1), 10),
          "fashion_mnist": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10),
          "cifar100": ((32, 32, 3), 100), "tiny_imagenet": ((64, 64, 3), 200)}


def build(cfg, input_shape=None, num_classes=None, backend=None):
  """(resolved compute, model) of a RunConfig as the trainer builds them, for its dataset's
  shapes unless given; with `backend` ('gpu', 'tpu'), as on that platform."""
  from noprop_jax import trainer

  shape, m = SHAPES.get(cfg.data.dataset, (None, None))
  shape = tuple(input_shape) if input_shape is not None else shape
  compute = trainer.resolve_compute(cfg, backend=backend)
  return compute, trainer.build_model(cfg, shape, num_classes or m, compute, backend=backend)


def make_model(method: str = "dt", input_shape=None, num_classes=None, **settings):
  """The Model of `RunConfig.create(method, **settings)`, built as the trainer builds it
  (`build`): for the dataset's shapes (default digits) unless given."""
  from noprop_jax.config import RunConfig

  return build(RunConfig.create(method, **settings), input_shape, num_classes)[1]


def library_methods() -> tuple[str, ...]:
  """The names of the library's own methods, in registration order: not a method that a
  test registers (its own module's, as tests/own_method.py, or a copy of a library record
  under a test-only name, as `counted_method`), which may share the process."""
  from noprop_jax import method as methods

  return tuple(r.name for r in methods.registered() if r.Model.__module__.startswith("noprop_jax.")
               and getattr(sys.modules[r.Model.__module__], "METHOD", None) is r)


def at_most_traced(fn, n: int = 1):
  """`fn` failing (chex.assert_max_traces) when traced more than `n` times. Counted from
  zero: chex keys its counts on where and what is wrapped, so a test that wraps the same
  function again (a parametrized test, a loop) would otherwise add to the earlier count."""
  chex.clear_trace_counter()
  return chex.assert_max_traces(fn, n=n)


@pytest.fixture
def method_registry():
  """noprop_jax.method, its registry restored after the test: what the test registers (a
  `counted_method`, a record of its own) is gone after it, and what it replaced is back,
  so that later tests' choices, messages and tables list the library's methods only."""
  from noprop_jax import method as methods

  before = methods.registered()
  yield methods
  if methods.registered() != before:  # the same records, in the same order
    for r in methods.registered():
      methods.unregister(r.name)
    for r in before:
      methods.register(r)


@pytest.fixture
def counted_method(method_registry):
  """`counted_method(method, name, n=1)`: a copy of the registered method `method`,
  registered for this test under `name`, whose train_step fails the test when traced more
  than `n` times (`at_most_traced`). The trainer builds its steps per train_step function,
  so the copy's steps are traced and compiled afresh for the test, whatever steps earlier
  tests built: no cache to clear."""

  def counted(method: str, name: str, n: int = 1):
    record = method_registry.get(method)
    return method_registry.register(dataclasses.replace(
        record, name=name, train_step=at_most_traced(record.train_step, n)), replace=True)

  return counted


def stepper(cfg, model, compute, n: int):
  """The trainer's epoch step for cfg as `(state, inputs, labels) -> (state, metrics)`, each
  call with the batch order of its step's pass (`trainer.batch_order`), as the loop does."""
  from noprop_jax import trainer

  step, per_pass = trainer.make_epoch_step(cfg, model, compute, n), n // cfg.train.batch_size
  return lambda state, x, y: step(state, x, y, trainer.batch_order(state["rng"], state["step"],
                                                                     n, per_pass))


class Killed(Exception):
  """A simulated kill of a training run (`killed_after`)."""


@contextlib.contextmanager
def killed_after(step: int):
  """Inside, `trainer.train` dies right after training step `step` (asked for the next
  step, it raises Killed), as a kill -9 during that next step would: what was written by
  then stays, nothing after it is."""
  from noprop_jax import trainer

  real = trainer.setup

  def setup(*args, **kw):
    run, state = real(*args, **kw)
    step_fn, done = run.step_fn, [run.start]

    def dies(*a):
      if done[0] >= step:
        raise Killed(step)
      done[0] += 1
      return step_fn(*a)

    run.step_fn = dies
    return run, state

  trainer.setup = setup
  try:
    yield
  finally:
    trainer.setup = real


def assert_trees(got, want, atol=0.0, rtol=0.0, what: str = "") -> None:
  """`got` has `want`'s structure, and its leaves equal `want`'s: exactly by default
  (chex.assert_trees_all_equal: np.testing.assert_array_equal per leaf, NaN equal to NaN);
  with `atol` or `rtol`, up to |got - want| <= atol + rtol |want| (chex.assert_trees_all_close,
  np.testing.assert_allclose per leaf). `atol` may be a function of `want`'s leaf giving
  that leaf's tolerance (`reordering_atol`), a leaf whose tolerance is None not compared.
  `what` prefixes the error."""
  try:
    if callable(atol):
      chex.assert_trees_all_equal_structs(got, want)
      for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        tol = atol(w)
        if tol is not None:
          try:
            chex.assert_trees_all_close(g, w, rtol=rtol, atol=tol)
          except AssertionError as e:
            raise AssertionError(f"leaf {jax.tree_util.keystr(path)} (atol {tol:.3g}): {e}") from None
    elif atol == 0 and rtol == 0:
      chex.assert_trees_all_equal(got, want)
    else:
      chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)
  except AssertionError as e:
    if what:
      raise AssertionError(f"{what}: {e}") from None
    raise


def reordering_atol(ref) -> float | None:
  """The tolerance of a state leaf for "equal up to float reordering": 2e-3 of its scale plus
  1% of one Adam step (lr = 1e-3). None below a scale of 1e-3: biases whose constant shift
  a later BatchNorm removes get a zero gradient up to float noise, which Adam turns into
  steps of up to lr, so they are not comparable."""
  scale = float(np.abs(np.asarray(ref, np.float64)).max()) if np.size(ref) else 0.0
  return 2e-3 * scale + 1e-5 if scale >= 1e-3 else None


# ----------------------------------------------------------------------------- test order
# The suite runs on two xdist workers, which take tests in collection order. Started last,
# a long test leaves the other worker idle at the end; started first, the short tests fill
# in around it. So the longest (by a full run's --durations, longest first) go first; the
# rest keep their order. A renamed test only loses its place, nothing else.
LONGEST_FIRST = (
    "tests/test_multihost_cli.py::test_a_lost_process",
    "tests/test_mesh.py::",
    "tests/test_own_method.py::test_it_gets_rows_in_the_comparison_and_the_benchmark",
    "tests/test_torch_reference.py::test_the_benchmark_times_both_side_by_side",
    "tests/test_parallel.py::test_every_blocks_per_step_setting_takes_the_same_step",
    "tests/test_benchmark.py::test_benchmark_rows",
    "tests/test_trainer.py::test_resume_after_interruption_is_exact",
    "tests/test_own_method.py::test_it_trains_resumes_exactly_and_runs_from_the_command_line",
    "tests/test_multihost.py::",
    "tests/test_reliability.py::test_kill_9_mid_run_then_the_same_command_resumes",
    "tests/test_vit_block.py::test_noprop_dt_learns_the_digits_with_vit_blocks",
    "tests/test_ct_fm_training.py::test_short_digits_run_learns_and_logs",
    "tests/test_compare.py::test_a_row_trains_and_is_tabled_with_memory_and_block_calls",
    "tests/test_trainer.py::test_short_digits_run_learns_and_writes_metrics",
    "tests/test_notebook.py::test_notebook_runs_and_reports_accuracies",
    "tests/test_parallel.py::test_training_loop_has_no_hidden_host_transfers",
    "tests/test_trainer.py::test_cli_trains_on_a_npz_file",
    "tests/test_baselines.py::test_backprop_trains_and_evaluates",
    "tests/test_dt.py::test_step_gradient_is_the_gradient_of_the_loss",
    "tests/test_host_memory.py::test_the_environment_variable_leaves_malloc_alone",
    "tests/test_diffusion_blocks.py::test_every_blocks_per_step_setting_gives_the_same_step",
    "tests/test_dt.py::test_train_step_updates_each_block_from_its_own_data_only",
    "tests/test_parallel.py::test_bfloat16_computes_in_bf16_and_keeps_float32_state",
    "tests/test_parallel.py::test_auto_blocks_per_step_takes_the_largest_that_fits",
    "tests/test_diffusion_blocks.py::test_trains_on_the_digits_from_the_command_line_settings",
    "tests/test_ct_fm_training.py::test_ct_resume_after_interruption_is_exact",
    "tests/test_readme.py::",
    "tests/test_solvers.py::test_euler_maruyama_weak_error_on_ornstein_uhlenbeck",
    "tests/test_continual.py::test_one_run_end_to_end_on_the_digits",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    return next((i for i, p in enumerate(LONGEST_FIRST) if item.nodeid.startswith(p)),
                len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: the rest keep their order
