"""Greedy local learning: no gradient crosses blocks, memory like NoProp's scan and not like
backprop's, each block its own optimizer, training on the digits."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees, make_model
from noprop_jax import backprop, blocks, core, dt, local, trainer
from noprop_jax.config import RunConfig
from noprop_jax.core import Compute, Optim

M = 10
# The models: `make_model("local", T=3, **SMALL)`, at the digits' shapes.
SMALL = dict(block="mlp", hidden=32, depth=1, dropout=0.0)


def _batch(digits, n=32):
  return digits.train.images[:n], digits.train.labels[:n]


def _nonzero_blocks(tree) -> list[int]:
  """The blocks (leading-axis indices) where any leaf of `tree` is non-zero."""
  T = jax.tree.leaves(tree)[0].shape[0]
  return [t for t in range(T) if any(np.abs(np.asarray(a[t])).max() > 0 for a in jax.tree.leaves(tree))]


@pytest.mark.parametrize("t", [0, 1, 2])
def test_a_blocks_objective_reaches_its_own_parameters_only(t, digits):
  model, (x, y) = make_model("local", T=3, **SMALL), _batch(digits)
  state = local.init(model, jax.random.key(0))
  term = lambda p: local.loss(model, p, state["stats"], x, y, jax.random.key(1))[1]["block_loss"][t]
  assert _nonzero_blocks(jax.grad(term)(state["params"])) == [t]
  # The backprop baseline's chain, for contrast: its loss reaches every block.
  bmodel = backprop.Model(model.block, (8, 8, 1), M, T=3)
  bstate = backprop.init(bmodel, jax.random.key(0))
  g = jax.grad(lambda p: backprop.loss(bmodel, Compute("unroll"), p, bstate["stats"], x, y,
                                       jax.random.key(1))[0])(bstate["params"])
  assert _nonzero_blocks(g["blocks"]) == [0, 1, 2]


@pytest.mark.parametrize("formulation", ["unroll", "scan"])
def test_block_by_block_gradients_are_the_summed_objectives_gradient(formulation, digits):
  model, (x, y) = make_model("local", T=3, **SMALL), _batch(digits)
  state = local.init(model, jax.random.key(0))
  g, aux = local.gradients(model, Compute(formulation).resolve(3), state, x, y)
  (value, m), ref = jax.value_and_grad(
      lambda p: local.loss(model, p, state["stats"], x, y, core.step_key(state)), has_aux=True)(
          state["params"])
  np.testing.assert_allclose(aux["block_loss"], m["block_loss"], rtol=1e-5)
  np.testing.assert_allclose(value, np.sum(aux["block_loss"]), rtol=1e-5)
  assert_trees(g, ref, atol=1e-7, rtol=1e-4)
  assert _nonzero_blocks(g["blocks"]) == [0, 1, 2]


def test_each_block_has_its_own_optimizer_and_head(digits):
  model, (x, y) = make_model("local", T=3, **SMALL), _batch(digits)
  state = local.init(model, jax.random.key(0))
  assert state["params"]["head"]["kernel"].shape == (3, M, M)
  new, m = jax.jit(partial(local.train_step, model, Optim(), Compute("scan").resolve(3)))(state, x, y)
  assert m["block_loss"].shape == m["block_accuracy"].shape == (3,) and float(m["skipped"]) == 0
  np.testing.assert_array_equal(new["opt"][1][0].count, [1, 1, 1])  # one count per block
  # A block whose gradient is tiny still moves by about lr: Adam normalises per block.
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(new["params"])):
    moved = np.abs(np.asarray(b) - np.asarray(a)).reshape(3, -1).max(axis=1)
    assert np.all(moved > 5e-4) and np.all(moved < 2e-3), moved


def _peak(mod, model, formulation):
  """XLA's memory analysis of one donated training step (arguments + temporaries)."""
  state = jax.eval_shape(lambda: mod.init(model, jax.random.key(0)))
  x = jax.ShapeDtypeStruct((2048, 8, 8, 1), jnp.float32)
  y = jax.ShapeDtypeStruct((2048,), jnp.int32)
  compute = Compute(formulation).resolve(model.T)
  step = jax.jit(partial(mod.train_step, model, Optim(), compute), donate_argnums=0)
  return core.peak_bytes(step.lower(state, x, y).compile())


def test_memory_per_step_is_like_noprop_dts_scan_not_like_backprops():
  # The same block in each (the mlp's default width and depth), without dropout.
  mk = lambda mod: make_model(mod.__name__.split(".")[-1], T=10, block="mlp", dropout=0.0)
  assert local.AUTO_FORMULATION == "scan"
  loc, nop = _peak(local, mk(local), "scan"), _peak(dt, mk(dt), "scan")
  bp = min(_peak(backprop, mk(backprop), f) for f in ("scan", "unroll"))
  assert loc < 0.5 * bp, (loc, bp)
  assert loc < 1.2 * nop, (loc, nop)


def test_trains_on_the_digits(tmp_path):
  cfg = RunConfig.create("local", dataset="digits", block="mlp", hidden=128, T=3, epochs=6,
                         inference_runs=1)
  assert trainer.resolve_compute(cfg).formulation == "scan"
  s = trainer.train(cfg, tmp_path, progress=False, print_fn=lambda _: None)
  assert s["test_accuracy"] > 0.9, s["test_accuracy"]  # chance is 0.1


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="T >= 1"):
    local.Model(None, (8, 8, 1), M, T=0)
  with pytest.raises(ValueError, match=r"block\(x, z\).*MLPTimeBlock"):
    local.Model(blocks.MLPTimeBlock(M), (8, 8, 1), M)
  with pytest.raises(ValueError, match="blocks-per-step"):
    RunConfig.create("local", blocks_per_step=2)
  with pytest.raises(ValueError, match="'blocks' mesh axis"):
    RunConfig.create("local", mesh="blocks=2")
  with pytest.raises(ValueError, match="embedding"):
    RunConfig.create("local", embedding="learned")
