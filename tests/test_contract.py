"""The method contract, checked once for every registered method: the library's, and one
defined outside the package (`own_method`, registered on import).

Each method runs as the trainer runs it (its record, a config's model and state) on a
tiny MLP block: init, one step, inference, evaluation, donation, one compiled step for
two seeds, block independence where its blocks are side by side, and bad inputs refused.
"""

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax import method as methods
from noprop_jax import core, trainer
from noprop_jax.config import RunConfig, method_settings

import own_method
from conftest import at_most_traced, library_methods

# Importing the module registered its method; it is registered only while this module's
# tests run (`_own_method`), so that other tests' tables and messages list the library's.
if own_method.METHOD.name in methods.names():  # (not when another module imported it first)
  methods.unregister(own_method.METHOD.name)
SHAPE, M, B = (8, 8, 1), 10, 16
NAMES = (*library_methods(), own_method.METHOD.name)
SIDE_BY_SIDE = [n for n in library_methods() if methods.get(n).side_by_side] + (
    [own_method.METHOD.name] if own_method.METHOD.side_by_side else [])
# summary.json's entries that the trainer writes for every method.
TRAINER_SUMMARY = {"test_accuracy", "test_accuracy_mean_path", "test_accuracy_stochastic",
                   "test_accuracy_stochastic_runs", "inference", "params_per_block",
                   "train_seconds", "compile_seconds", "epochs", "steps", "n_train", "n_test",
                   "input_shape", "num_classes", "data_source", "backend", "compute",
                   "conv_impl", "host_memory", "mesh", "config"}


@pytest.fixture(scope="module", autouse=True)
def _own_method():
  methods.register(own_method.METHOD, replace=True)
  yield
  methods.unregister(own_method.METHOD.name)


@functools.lru_cache(maxsize=None)
def setting_up(name: str, seed: int = 0):
  """(record, config, resolved compute, model, state) of a small run of method `name`."""
  own = method_settings(name)
  kw = {k: v for k, v in (("T", 2), ("inference_steps", 4)) if k in own}
  cfg = RunConfig.create(name, block="mlp", hidden=16, depth=1, seed=seed, **kw)
  compute = trainer.resolve_compute(cfg)
  model = trainer.build_model(cfg, SHAPE, M, compute)
  return cfg.method_record, cfg, compute, model, trainer.init_state(cfg, model, jax.random.key(seed))


def batch(seed: int = 0):
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.randint(0, 256, (B, *SHAPE), dtype=np.uint8)),
          jnp.asarray(rng.randint(0, M, (B,)).astype(np.int32)))


def fresh(state):
  return jax.tree.map(jnp.copy, state)


@functools.lru_cache(maxsize=None)
def jitted_step(name: str):
  record, cfg, compute, model, _ = setting_up(name)
  return jax.jit(functools.partial(record.train_step, model, cfg.train.optim, compute),
                 donate_argnums=0)


def test_the_registry_holds_the_library_methods_and_the_users():
  assert {"dt", "ct", "fm", "backprop", "adjoint", "diffusion_blocks", "local", "dt_eps"} <= set(NAMES)
  assert methods.get("dt_eps") is own_method.METHOD


@pytest.mark.parametrize("name", NAMES)
def test_the_record_describes_the_method(name):
  record, cfg, _, model, state = setting_up(name)
  assert record.name == name and cfg.method == name
  assert [f.name for f in dataclasses.fields(record.Model)][:3] == ["block", "input_shape", "num_classes"]
  methods.check_state(record, state, cfg.T)  # step, rng and the stacked entries
  assert record.side_by_side == bool(record.stacked)
  for k in record.stacked:  # stacked entries lead with T, the others do not
    assert all(a.shape[0] == cfg.T for a in jax.tree.leaves(state[k])), k
  x, y = batch()
  _, metrics = jax.eval_shape(jitted_step(name), state, x, y)
  methods.check_metrics(record, metrics)  # exactly loss, skipped and the declared metrics
  assert set(record.shown) <= set(record.metrics)
  assert cfg.train.epochs == record.budget("digits") and cfg.T >= 1
  if record.side_by_side:  # one block's share of the stacked parameters
    params = state[record.stacked[0]]["params"]
    assert record.num_block_params(state) == core.count_params(params) // cfg.T
  if "T" in method_settings(name):
    assert f"T={cfg.T}" in record.describe(model, cfg.train.compute, state)
  if record.summary is not None:  # its own summary.json entries: host values, new keys
    own = record.summary(model, state)
    assert json.loads(json.dumps(own)) == own and not set(own) & TRAINER_SUMMARY


@pytest.mark.parametrize("name, settings", [
    ("fm", dict(embedding="learned")), ("fm", dict(embedding="prototype")),
    ("ct", dict(embedding="learned")), ("dt", dict(embedding="prototype", classifier="radial")),
    ("dt", dict(training="sequential"))])
def test_the_declared_metrics_hold_for_other_settings_too(name, settings):
  """A step's metrics may not depend on the settings: the trainer checks them against the
  record for every run."""
  own = {k: v for k, v in (("T", 2), ("inference_steps", 4)) if k in method_settings(name)}
  cfg = RunConfig.create(name, block="mlp", hidden=16, depth=1, **own, **settings)
  compute = trainer.resolve_compute(cfg)
  model = trainer.build_model(cfg, SHAPE, M, compute)
  state = jax.eval_shape(lambda: trainer.init_state(cfg, model, jax.random.key(0)))
  x, y = batch()
  record = cfg.method_record
  if cfg.train.training == "sequential":
    step = functools.partial(record.sequential_step, model, cfg.train.optim, compute, block=0)
  else:
    step = functools.partial(record.train_step, model, cfg.train.optim, compute)
  methods.check_metrics(record, jax.eval_shape(step, state, x, y)[1])


@pytest.mark.parametrize("name", NAMES)
def test_one_step_learns_and_inference_agrees_with_evaluation(name):
  record, cfg, compute, model, state = setting_up(name)
  x, y = batch()
  new, m = jitted_step(name)(fresh(state), x, y)
  assert int(new["step"]) == 1 and float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, new)
  assert any(jax.tree.leaves(moved)), "the step changed nothing"
  # The parameters that changed are float32, as they were.
  chex.assert_trees_all_equal_dtypes(state, new)
  logits = record.predict(model, new, x)
  chex.assert_shape(logits, (B, M))
  chex.assert_type(logits, jnp.float32)
  correct, runs = record.eval_counts(model, compute, new, x, y, jax.random.key(1), 3)
  # The mean path of evaluation is predict's mean path.
  assert int(correct) == int(jnp.sum(jnp.argmax(logits, -1) == y))
  chex.assert_shape(runs, (3,))
  assert all(0 <= int(r) <= B for r in runs)
  # Padding rows (label -1) never count.
  pad_y = y.at[: B // 2].set(-1)
  correct_pad, _ = record.eval_counts(model, compute, new, x, pad_y, jax.random.key(1), 0)
  assert int(correct_pad) == int(jnp.sum((jnp.argmax(logits, -1) == y)[B // 2:]))


@pytest.mark.parametrize("name", NAMES)
def test_the_step_donates_the_state(name):
  _, _, _, _, state = setting_up(name)
  x, y = batch()
  given = fresh(state)
  jitted_step(name)(given, x, y)
  assert all(a.is_deleted() for a in jax.tree.leaves(given))


@pytest.mark.parametrize("name", NAMES)
def test_two_seeds_share_one_compiled_step_and_train_differently(name):
  record, cfg, compute, model, state0 = setting_up(name)
  state1 = setting_up(name, seed=1)[4]
  counted = at_most_traced(record.train_step, n=1)
  step = jax.jit(functools.partial(counted, model, cfg.train.optim, compute))
  x, y = batch()
  a, _ = step(state0, x, y)
  b, _ = step(state1, x, y)  # a retrace here fails the test
  assert not np.array_equal(np.asarray(jax.tree.leaves(a["rng"])[0]),
                            np.asarray(jax.tree.leaves(b["rng"])[0]))
  params = lambda s: jax.tree.leaves({k: v for k, v in s.items() if k not in ("step", "rng")})
  assert any(not np.array_equal(u, v) for u, v in zip(params(a), params(b)))


@pytest.mark.parametrize("name", SIDE_BY_SIDE)
def test_side_by_side_blocks_train_independently(name):
  """Perturbing block 0 before a step changes no other block's update."""
  record, cfg, compute, model, state = setting_up(name)
  x, y = batch()
  bumped = fresh(state)
  key = record.stacked[0]
  bumped[key] = jax.tree.map(lambda a: a.at[0].add(0.1) if jnp.issubdtype(a.dtype, jnp.floating)
                             else a, bumped[key])
  step = jax.jit(functools.partial(record.train_step, model, cfg.train.optim, compute))
  a, _ = step(fresh(state), x, y)
  b, _ = step(bumped, x, y)
  for k in record.stacked:
    rest_a = jax.tree.map(lambda v: v[1:], a[k])
    rest_b = jax.tree.map(lambda v: v[1:], b[k])
    chex.assert_trees_all_equal(rest_a, rest_b)
  first_a = jax.tree.leaves(jax.tree.map(lambda v: v[0], a[key]["params"]))
  first_b = jax.tree.leaves(jax.tree.map(lambda v: v[0], b[key]["params"]))
  assert any(not np.array_equal(u, v) for u, v in zip(first_a, first_b))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused_with_a_clear_error(name):
  record, cfg, compute, model, state = setting_up(name)
  x, y = batch()
  with pytest.raises(ValueError, match="inputs must have shape"):
    record.train_step(model, cfg.train.optim, compute, state, x[:, :4], y)
  with pytest.raises(ValueError, match="labels"):
    record.train_step(model, cfg.train.optim, compute, state, x, y.at[0].set(M))
  with pytest.raises(ValueError, match="inputs must have shape"):
    record.predict(model, state, x.reshape(B, -1))


# ----------------------------------------------------------------------------- the record

def _record(**kw):
  base = methods.get("dt")
  return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("change, error", [
    (dict(name="not a name"), "Python identifier"),
    (dict(shown=("nope",)), "not in its metrics"),
    (dict(resumable=("lr",)), "not its settings"),
    (dict(epochs={"mnist": 3}), "'digits' budget"),
    (dict(init=None), "init must be a function"),
    (dict(metrics=("block_loss", "epoch")), "names the trainer gives its own"),
    (dict(Model=methods.get("ct").Model), "needs a Model setting T"),  # stacked, no T
])
def test_a_record_that_breaks_the_contract_is_refused(change, error):
  with pytest.raises((ValueError, TypeError), match=error):
    _record(**change)


def test_registering_names_and_replacing(method_registry):
  other = _record(name="contract_test_method")
  assert methods.register(other) is other and methods.get("contract_test_method") is other
  again = _record(name="contract_test_method")  # the same module's Model: a rerun cell
  assert methods.register(again) is again
  @dataclasses.dataclass(frozen=True)
  class Model:  # another module's (here: this test's) method under a taken name
    block: object
    input_shape: tuple
    num_classes: int
    T: int = 2
  with pytest.raises(ValueError, match="already registered"):
    methods.register(_record(name="dt", Model=Model))
  # A copy of the library's record with another step is not the same method defined again.
  with pytest.raises(ValueError, match="already registered"):
    methods.register(_record(train_step=lambda *a: a))
  assert methods.get("dt").train_step.__module__ == "noprop_jax.dt"
  assert methods.get("dt").Model.__module__ == "noprop_jax.dt"
  with pytest.raises(ValueError, match="unknown method 'nope'.*--method-module"):
    methods.get("nope")
  with pytest.raises(TypeError, match="Method"):
    methods.register("dt")
  assert methods.unregister("contract_test_method") is again
  with pytest.raises(ValueError, match="no method named 'contract_test_method'"):
    methods.unregister("contract_test_method")


def test_a_setting_named_like_another_concerns_is_refused(method_registry):
  @dataclasses.dataclass(frozen=True)
  class Model:
    block: object
    input_shape: tuple
    num_classes: int
    T: int = 2
    seed: int = 0  # TrainConfig's: its flag would set the run's seed, not this

  methods.register(_record(name="contract_clash", Model=Model))
  with pytest.raises(ValueError, match=r"contract_clash.*\['seed'\] have the names"):
    RunConfig.create("contract_clash")


def test_the_trainer_refuses_a_method_whose_state_or_metrics_break_the_contract(tmp_path, digits,
                                                                               method_registry):
  from noprop_jax import dt

  no_step = _record(name="contract_bad_state", init=lambda *a, **k: {
      k2: v for k2, v in dt.init(*a, **k).items() if k2 != "step"})
  methods.register(no_step, replace=True)
  cfg = RunConfig.create("contract_bad_state", block="mlp", hidden=8, depth=1, T=2, epochs=1)
  with pytest.raises(ValueError, match="contract_bad_state.*breaks the method contract"):
    trainer.train(cfg, tmp_path / "a", dataset=digits, progress=False, print_fn=lambda s: None)
  extra = _record(name="contract_bad_metrics", metrics=("block_loss",))
  methods.register(extra, replace=True)
  cfg = RunConfig.create("contract_bad_metrics", block="mlp", hidden=8, depth=1, T=2, epochs=1)
  with pytest.raises(ValueError, match="contract_bad_metrics.*make them agree"):
    trainer.train(cfg, tmp_path / "b", dataset=digits, progress=False, print_fn=lambda s: None)
