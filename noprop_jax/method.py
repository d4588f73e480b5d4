"""What a method is: the record every method module provides, and the one registry of them.

A method trains and evaluates a `Model` (a frozen dataclass: the block, the data's
shapes, then the method's own settings) through a handful of pure functions. The
trainer, the command line, the workdir checks and the experiment scripts know a method
only through its `Method` record, found by name in the registry:

  import my_method                       # defines my_method.METHOD = Method(...)
  noprop_jax.method.register(my_method.METHOD)
  trainer.train(RunConfig.create("my_method", T=4), "runs/mine")

or from the command line, `experiments/train.py --method-module my_method --method my_method`
(the module registers its method when imported). The documentation's "Writing your
own method" (docs/guide/own-method.md) walks through a complete one.

The functions' signatures (the names are the record's fields):

  init(model, key, optim, embed=None) -> state
      The whole training state, a pytree of arrays: parameters, optimizer state, and
      the entries `step` (int32 step count) and `rng` (the run's key as raw uint32 data),
      which the trainer reads to order batches (`core.stacked_state` builds them for
      stacked blocks; else `core.new_rng(key)`). `embed`: prototype rows for a method
      whose settings include embedding='prototype'.
  train_step(model, optim, compute, state, x, y) -> (state, metrics)
      One optimizer step on a batch, pure and jittable. `metrics` holds 'loss' (the
      value the step minimised), 'skipped' (1.0 where the update was refused as
      non-finite, `core.update_ok`) and the method's `metrics`.
  eval_counts(model, compute, state, x, y, key, runs) -> (correct, correct_runs)
      Correct predictions on a batch by the deterministic path, and by `runs` sampled
      paths ([runs]). Labels -1 are padding and never count.
  predict(model, state, x, key=None, mode='mean') -> logits [B, num_classes]
  num_block_params(state) -> int        parameters of one block (summary.json's params_per_block)
  block_calls(model) -> int             block evaluations to classify one batch
  describe(model, compute, state) -> str  the run banner's words about the model
"""

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Mapping

import chex
import jax.numpy as jnp

# The named datasets' budget groups: a dataset not named here (a user's .npz file) takes
# the digits budget, sized for a CPU.
_SAME_BUDGET = {"fashion_mnist": "mnist", "tiny_imagenet": "cifar100"}


def budgets(digits: int, mnist: int, cifar10: int, cifar100: int) -> Mapping[str, int]:
  """Epochs per named dataset (the paper's Table 4 for its datasets): Fashion-MNIST trains
  as MNIST, Tiny ImageNet as CIFAR-100."""
  out = {"digits": digits, "mnist": mnist, "cifar10": cifar10, "cifar100": cifar100}
  return MappingProxyType({**out, **{d: out[s] for d, s in _SAME_BUDGET.items()}})


@dataclasses.dataclass(frozen=True, eq=False)  # compared (and hashed) by identity
class Method:
  """A method: its functions (see the module's docstring for their signatures) and
  what it supports. One per method module, as `METHOD`."""

  name: str  # registry key and --method value, e.g. 'dt'
  title: str  # human-readable name for banners and tables, e.g. 'NoProp-DT'
  Model: type  # frozen dataclass: block, input_shape, num_classes, then the method's settings
  init: Callable
  train_step: Callable
  eval_counts: Callable
  predict: Callable
  num_block_params: Callable
  block_calls: Callable
  describe: Callable
  # The block it trains: (x, z, t) -> output where True, (x, z) -> output where False.
  time_conditioned: bool
  # The paper's training budget (epochs) per dataset (`budgets`); others take 'digits'.
  epochs: Mapping[str, int]
  # State entries whose leaves lead with the blocks axis. A method with any trains its
  # blocks side by side, each on its own device under a 'blocks' mesh axis, and may
  # compute them a few at a time (blocks_per_step); its Model then has a setting `T`,
  # the number of blocks. Empty: one network.
  stacked: tuple[str, ...] = ()
  # Per-step metrics besides 'loss' and 'skipped' (each epoch records its last step's).
  metrics: tuple[str, ...] = ()
  # Scalar metrics printed on each epoch's line (a subset of `metrics`).
  shown: tuple[str, ...] = ()
  # Algorithm 1's step of one block: (model, optim, compute, state, x, y, block) ->
  # (state, metrics), block 0-based and possibly traced. None: not supported.
  sequential_step: Callable | None = None
  bf16: bool = False  # whether it computes in bfloat16 (precision='bfloat16')
  # Its settings that may change when a run resumes (they change inference only).
  resumable: tuple[str, ...] = ()
  # (model, state) -> its own entries in summary.json (host values), beside the trainer's.
  summary: Callable[[Any, Any], dict] | None = None
  # Epochs between test evaluations, by dataset, where evaluating costs more than an epoch.
  eval_every: Mapping[str, int] = dataclasses.field(default_factory=dict)
  # (settings, num_classes) -> the block's output size. None: num_classes (logits).
  block_outputs: Callable[[dict, int], int] | None = None
  # What formulation 'auto' means for it. None: the library's rule by backend (`Compute`).
  auto_formulation: str | None = None

  def __post_init__(self):
    if not self.name.isidentifier():
      raise ValueError(f"a method's name is a Python identifier (it is a flag value and a "
                       f"file name), got {self.name!r}")
    if not dataclasses.is_dataclass(self.Model):
      raise TypeError(f"method {self.name!r}: Model must be a dataclass whose first fields are "
                      "block, input_shape and num_classes, then the method's settings")
    first = [f.name for f in dataclasses.fields(self.Model)][:3]
    if first != ["block", "input_shape", "num_classes"]:
      raise TypeError(f"method {self.name!r}: Model's first fields must be block, input_shape, "
                      f"num_classes; got {first}")
    if "digits" not in self.epochs:
      raise ValueError(f"method {self.name!r}: epochs needs at least a 'digits' budget (the "
                       "default for datasets it does not name); use method.budgets(...)")
    taken = set(self.metrics) & RESERVED_METRICS
    if taken:
      raise ValueError(f"method {self.name!r}: metrics {sorted(taken)} are names the trainer "
                       "gives its own entries (loss and skipped come with every step); rename them")
    if self.stacked and "T" not in settings(self):
      raise ValueError(f"method {self.name!r}: a method with stacked blocks ({self.stacked}) "
                       "needs a Model setting T, the number of blocks")
    unknown = set(self.shown) - set(self.metrics)
    if unknown:
      raise ValueError(f"method {self.name!r}: shown {sorted(unknown)} are not in its metrics")
    unknown = set(self.resumable) - set(settings(self))
    if unknown:
      raise ValueError(f"method {self.name!r}: resumable {sorted(unknown)} are not its settings")
    for f in ("init", "train_step", "eval_counts", "predict", "num_block_params",
              "block_calls", "describe"):
      if not callable(getattr(self, f)):
        raise TypeError(f"method {self.name!r}: {f} must be a function")

  @property
  def side_by_side(self) -> bool:
    """Whether its T blocks train side by side (a 'blocks' mesh axis, blocks_per_step)."""
    return bool(self.stacked)

  @property
  def sequential(self) -> bool:
    """Whether it has Algorithm 1's one-block step (training='sequential')."""
    return self.sequential_step is not None

  def budget(self, dataset: str) -> int:
    """Epochs to train on `dataset` when none are given."""
    return self.epochs.get(dataset, self.epochs["digits"])


# Per-epoch record entries the trainer writes itself (metrics.jsonl), and the step's own.
RESERVED_METRICS = {"loss", "skipped", "epoch", "step", "train_loss", "seconds",
                    "train_accuracy", "test_accuracy", "test_accuracy_mean_path",
                    "test_accuracy_stochastic", "eval_seconds"}


def settings(method: Method) -> dict[str, dataclasses.Field]:
  """The method's own settings: its Model's fields after block, input_shape, num_classes."""
  return {f.name: f for f in dataclasses.fields(method.Model)[3:]}


def check_state(method: Method, state: Any, T: int) -> None:
  """What the trainer relies on in a method's state (`init`'s output, arrays or shapes): a
  scalar int32 'step', the run's key as uint32 data in 'rng', and every `stacked` entry
  leading with the T blocks. A ValueError naming the method and the broken rule."""
  try:
    chex.assert_shape(state["step"], ())
    chex.assert_type(state["step"], jnp.int32)
    chex.assert_type(state["rng"], jnp.uint32)
    for k in method.stacked:
      chex.assert_tree_shape_prefix(state[k], (T,))
  except (AssertionError, KeyError, TypeError) as e:
    raise ValueError(f"method {method.name!r}: its init's state breaks the method contract "
                     "(a scalar int32 'step', uint32 key data 'rng', and every entry of "
                     f"`stacked` {method.stacked} leading with T={T}): {e}") from None


def check_metrics(method: Method, metrics: Mapping[str, Any]) -> None:
  """What the trainer relies on in a train_step's metrics (arrays or shapes): a scalar
  float 'loss' and 'skipped', and exactly the record's `metrics` besides."""
  want = {"loss", "skipped", *method.metrics}
  try:
    chex.assert_shape([metrics["loss"], metrics["skipped"]], ())
    chex.assert_type([metrics["loss"], metrics["skipped"]], float)
  except (AssertionError, KeyError) as e:
    raise ValueError(f"method {method.name!r}: its train_step's metrics need scalar float "
                     f"'loss' and 'skipped' (core.skipped): {e}") from None
  if set(metrics) != want:
    raise ValueError(f"method {method.name!r}: its train_step returns metrics "
                     f"{sorted(metrics)}, its record declares {sorted(want)} (loss, skipped and "
                     "`metrics`): make them agree")


# ----------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Method] = {}
DEFAULT = "dt"  # the method a run config names when it names none


def register(method: Method, replace: bool = False) -> Method:
  """Make `method` known by its name to the trainer, the configuration, the command line
  and the experiment scripts; returns it. A name taken by a method of another module is
  an error unless `replace`; one defined again by the same module (a notebook cell run
  again, a module reloaded) replaces it."""
  if not isinstance(method, Method):
    raise TypeError(f"register takes a noprop_jax.method.Method, got {type(method).__name__}")
  _builtins()
  old = _REGISTRY.get(method.name)
  same_source = old is not None and _source(old) == _source(method)
  if old is not None and old is not method and not (replace or same_source):
    raise ValueError(f"a method named {method.name!r} is already registered ({old.title}); "
                     "choose another name, or pass replace=True to replace it")
  _REGISTRY[method.name] = method
  return method


def _source(method: Method) -> tuple[str, ...]:
  """Where a record's Model and functions are defined: a record defined again by the same
  code (a rerun cell) has the same source; a copy with another function does not."""
  return tuple(f"{f.__module__}.{getattr(f, '__qualname__', '')}" for f in
               (method.Model, method.init, method.train_step, method.eval_counts, method.predict))


def unregister(name: str) -> Method:
  """Forget the method registered as `name` (e.g. a notebook's experiment); returns it."""
  _builtins()
  if name not in _REGISTRY:
    raise ValueError(f"no method named {name!r} is registered; registered: {list(_REGISTRY)}")
  return _REGISTRY.pop(name)


def get(name: str) -> Method:
  """The registered method of that name; a clear error naming the registered ones."""
  _builtins()
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; registered: {list(_REGISTRY)}. A method of "
                     "your own is registered by importing the module that calls "
                     "noprop_jax.method.register (command line: --method-module MODULE)")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered methods' names, the library's first, in registration order."""
  _builtins()
  return tuple(_REGISTRY)


def registered() -> tuple[Method, ...]:
  _builtins()
  return tuple(_REGISTRY.values())


def _builtins() -> None:
  """Register the library's methods (once: on the first lookup, so that importing this
  module, as every method module does, imports no method)."""
  if not _loaded:
    _loaded.append(True)
    from noprop_jax import adjoint, backprop, ct, diffusion_blocks, dt, fm, local
    for mod in (dt, ct, fm, diffusion_blocks, local, backprop, adjoint):
      register(mod.METHOD)


_loaded: list[bool] = []


