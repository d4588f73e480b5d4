"""The functional API at its boundary: every method refuses a bad batch with a clear
ValueError (its checked step, its eager `train_step`, `predict`), and a step jitted by the
user drops a bad batch's update whole, reporting it in metrics['skipped']."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees, library_methods
from noprop_jax import blocks, core, dt, fm
from noprop_jax import method as methods
from noprop_jax.core import Compute, Optim

# Every method of the library, by its record in the registry (not a method a test of the
# same process registers: its functions are its author's, not the library's).
METHODS = library_methods()
SHAPE, M, B = (8,), 10, 4
# These tiny programs run a few times each: compiling them without XLA's costlier passes
# halves the file's time, and what is checked (which values are kept) does not depend on it.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class BNBlock(nn.Module):
  """A tiny (x, z) -> logits block with BatchNorm statistics, which a dropped update keeps too."""

  @nn.compact
  def __call__(self, x, z, train=False):
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
    return nn.Dense(M)(jnp.concatenate([h, z], axis=-1))


def _model(name: str):
  """A tiny Model built directly, not from a RunConfig (conftest.make_model): the blocks
  here are this file's own (BNBlock: BatchNorm statistics a dropped update must keep too)
  or smaller than any configurable one, on vectors of 8 features."""
  record = methods.get(name)
  if not record.time_conditioned:  # (x, z) blocks: dt, backprop, local
    return record.Model(BNBlock(), SHAPE, M, T=2)
  if name == "diffusion_blocks":  # its blocks output d = embedding_dim features
    return record.Model(blocks.MLPTimeBlock(M, hidden=8, depth=1, t_dim=4), SHAPE, M, T=2,
                        embedding_dim=M)
  return record.Model(blocks.MLPTimeBlock(M, hidden=8, depth=1, t_dim=4), SHAPE, M,
                      inference_steps=2)


def _compute(model, name: str) -> Compute:
  """The default Compute resolved for the model, as the method's own make_train_step does."""
  return Compute().resolve(getattr(model, "T", 1), auto=methods.get(name).auto_formulation)


def _make_train_step(name: str, model):
  """The method's checked, jitted step (its module's `make_train_step(model)`)."""
  return core.jit_step(methods.get(name).train_step, model, Optim(), _compute(model, name))


# The checks run before any state is read (or donated): refusals need no initialised state,
# and no compile.
STATE = {"step": jnp.zeros((), jnp.int32)}


@pytest.fixture(scope="module")
def states():
  """Per method (initialised once, on first use): its initial state."""
  cache = {}

  def get(name):
    if name not in cache:
      key = jax.random.key(0)
      cache[name] = methods.get(name).init.lower(_model(name), key).compile(FAST)(key)
    return cache[name]

  return get


def _good():
  rng = np.random.RandomState(0)
  return rng.uniform(size=(B, *SHAPE)).astype(np.float32), np.arange(B, dtype=np.int32)


def _bad(case: str):
  """(x, y, a phrase of the error) for one kind of bad batch."""
  x, y = _good()
  if case == "label 12":
    return x, np.array([0, 1, 2, 12], np.int32), r"class indices in \[0, 10\), got values in \[0, 12\]"
  if case == "label -1":
    return x, np.array([0, -1, 2, 3], np.int32), r"class indices in \[0, 10\), got values in \[-1, 3\]"
  if case == "float labels":
    return x, y.astype(np.float32), "integer class indices in .*got dtype float32"
  if case == "one-hot labels":
    return x, np.eye(M, dtype=np.float32)[y], r"shape \[batch\], got shape \(4, 10\).*argmax"
  if case == "int one-hot labels":
    return x, np.eye(M, dtype=np.int32)[y], r"shape \[batch\], got shape \(4, 10\).*argmax"
  if case == "floats 0..255":
    return np.round(x * 255), y, r"floats in \[0, 1\], got values in \[\d+, \d+\]"
  if case == "uint8 0..16":
    return np.round(x * 16).astype(np.uint8), y, "uint8 with maximum 1[0-6]: .*0..16 levels"
  if case == "int32 images":
    return np.round(x * 255).astype(np.int32), y, "dtype int32: pass uint8 pixels 0..255 or floats"
  if case == "bool images":
    return x > 0.5, y, "dtype bool: pass uint8 pixels"
  if case == "NaN input":
    x[1, 2] = np.nan
    return x, y, "finite floats in .*got NaN or inf"
  if case == "empty batch":
    return x[:0], y[:0], r"at least one example, got an empty batch of shape \(0, 8\)"
  if case == "wrong image shape":
    return x[:, :6], y, r"shape \[batch, 8\] .*got x of shape \(4, 6\)"
  if case == "length mismatch":
    return x, y[:3], "same length, got 4 inputs and 3 labels"
  raise AssertionError(case)


CASES = ["label 12", "label -1", "float labels", "one-hot labels", "int one-hot labels",
         "floats 0..255", "uint8 0..16", "int32 images", "bool images", "NaN input", "empty batch",
         "wrong image shape", "length mismatch"]
INPUT_CASES = ["floats 0..255", "uint8 0..16", "int32 images", "bool images", "NaN input",
               "empty batch", "wrong image shape"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", METHODS)
def test_the_checked_step_refuses_a_bad_batch(name, case):
  step = _make_train_step(name, _model(name))
  x, y, match = _bad(case)
  with pytest.raises(ValueError, match=match):
    step(STATE, jnp.asarray(x), jnp.asarray(y))  # jax arrays: ranges computed on the device
  assert not STATE["step"].is_deleted()  # refused before the call that donates the state


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", METHODS)
def test_an_eager_train_step_refuses_a_bad_batch(name, case):
  model = _model(name)
  x, y, match = _bad(case)
  with pytest.raises(ValueError, match=match):
    methods.get(name).train_step(model, Optim(), _compute(model, name), STATE, x, y)  # numpy arrays


@pytest.mark.parametrize("case", INPUT_CASES)
@pytest.mark.parametrize("name", METHODS)
def test_predict_refuses_bad_inputs(name, case):
  x, _, match = _bad(case)
  with pytest.raises(ValueError, match=match):
    methods.get(name).predict(_model(name), STATE, x)


def test_messages_are_one_line_and_good_batches_pass():
  model = _model("dt")
  for case in CASES:
    x, y, _ = _bad(case)
    with pytest.raises(ValueError) as err:
      core.check_batch(model, x, y)
    assert "\n" not in str(err.value), case
  x, y = _good()
  core.check_batch(model, x, y)
  core.check_batch(model, jnp.asarray(x), jnp.asarray(y))
  core.check_batch(model, (x * 255).astype(np.uint8), y)  # 0..255 pixels
  core.check_batch(model, np.zeros((B, *SHAPE), np.uint8), y)  # an all-black batch
  core.check_batch(model, x.astype(jnp.bfloat16), y.astype(np.uint8))
  core.check_batch(model, x, np.array([0, -1, 9, -1]), padding=True)  # evaluation's padding
  with pytest.raises(ValueError, match=r"\[0, 10\) \(or -1: padding\), got values in \[-2, 9\]"):
    core.check_batch(model, x, np.array([0, -2, 9, 1]), padding=True)


def test_values_are_checked_only_where_concrete():
  """Under the user's jit the values are traced (the in-graph guard covers them); arrays a
  trace closes over are concrete, and checked."""
  model = _model("dt")
  x, y = _good()
  bad_y = jnp.array([0, 1, 2, 12])
  jax.jit(lambda x, y: core.check_batch(model, x, y))(x, bad_y)  # traced: no value check
  with pytest.raises(ValueError, match="got values in"):
    jax.jit(lambda x: core.check_batch(model, x, bad_y))(x)  # a constant of the trace
  with pytest.raises(ValueError, match="must have shape"):  # shapes: at trace time
    jax.jit(lambda x, y: core.check_batch(model, x, y))(x[:, :6], y)


def test_eval_counts_takes_padding_labels_and_refuses_others():
  model = _model("dt")
  x, _ = _good()
  count = lambda state, y: dt.eval_counts(model, _compute(model, "dt"), state, x, y,
                                          jax.random.key(1), 0)
  with pytest.raises(ValueError, match=r"\[0, 10\) \(or -1: padding\), got values in \[-1, 12\]"):
    count(STATE, np.array([0, 1, 12, -1]))
  # Concrete padded labels, checked as the call is traced (eval_shape: no compile).
  state = jax.eval_shape(dt.init, model, jax.random.key(0))
  mean, _ = jax.eval_shape(lambda s: count(s, np.array([0, 1, -1, -1], np.int32)), state)
  assert mean.shape == ()


# ----------------------------------------------------------------------------- the in-graph guard

@pytest.mark.parametrize("name", METHODS)
def test_a_bad_batch_under_the_users_jit_changes_nothing_but_the_step(states, name):
  """Parameters, optimizer state and BatchNorm statistics (dt's blocks, backprop's 'stats')
  stay bit for bit where the in-graph guard drops the update."""
  model, state = _model(name), states(name)
  # The user's own jit of `train_step`: the values are traced, so only the guard sees them.
  step = jax.jit(partial(methods.get(name).train_step, model, Optim(), _compute(model, name)),
                 compiler_options=FAST)
  x, y = _good()
  rest = lambda s: {k: v for k, v in s.items() if k != "step"}
  new, m = step(state, x, y)
  assert m["skipped"].dtype == jnp.float32 and float(m["skipped"]) == 0.0
  assert int(new["step"]) == int(state["step"]) + 1
  params = lambda s: s["params"] if "params" in s else s["blocks"]["params"]
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(params(new)), jax.tree.leaves(params(state))))
  x_nan = x.copy()
  x_nan[0, 0] = np.nan
  labels = lambda *ys: np.array(ys, np.int32)
  for bx, by in ((x_nan, y), (x, labels(0, 1, 2, 12)), (x, labels(-1, 1, 2, 3))):
    new, m = step(state, bx, by)
    assert float(m["skipped"]) == 1.0
    assert int(new["step"]) == int(state["step"]) + 1  # the batch order and noise move on
    assert_trees(rest(new), rest(state))  # parameters and optimizer state, bit for bit


def test_a_bad_batch_leaves_dt_sequential_step_unchanged(states):
  """Algorithm 1's step drops its update as the parallel one does."""
  model, state = _model("dt"), states("dt")
  step = jax.jit(lambda s, x, y: dt.sequential_step(model, Optim(), _compute(model, "dt"), s, x, y, 1),
                 compiler_options=FAST)
  x, y = _good()
  new, m = step(state, x, y)
  assert float(m["skipped"]) == 0.0
  kernel = lambda s: s["blocks"]["params"]["Dense_1"]["kernel"]
  assert np.array_equal(kernel(new)[0], kernel(state)[0])  # block 1 alone trains
  assert not np.array_equal(kernel(new)[1], kernel(state)[1])
  new, m = step(state, x, np.array([0, 1, 2, 10], np.int32))
  assert float(m["skipped"]) == 1.0 and int(new["step"]) == 1
  assert_trees({k: v for k, v in new.items() if k != "step"},
               {k: v for k, v in state.items() if k != "step"})
  with pytest.raises(ValueError, match=r"block must be in \[0, 2\) \(0-based\), got 2"):
    dt.sequential_step(model, Optim(), _compute(model, "dt"), state, x, y, 2)


def test_the_checked_steps_jitted_step_is_reachable():
  step = fm.make_train_step(_model("fm"))
  assert hasattr(step.jitted, "lower")  # the plain jitted step: no checks, no host sync


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("kw, match", [
    (dict(lr=float("inf")), "learning rate must be > 0 and finite, got lr=inf"),
    (dict(lr=float("nan")), "learning rate must be > 0 and finite, got lr=nan"),
    (dict(lr=0.0), "learning rate must be > 0 and finite, got lr=0.0"),
    (dict(weight_decay=float("inf")), "weight_decay must be >= 0 and finite, got weight_decay=inf"),
    (dict(weight_decay=float("nan")), "weight_decay must be >= 0 and finite, got weight_decay=nan"),
    (dict(grad_clip=float("inf")), "grad_clip must be >= 0 and finite .*got grad_clip=inf"),
])
def test_optim_refuses_non_finite_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    Optim(**kw)
