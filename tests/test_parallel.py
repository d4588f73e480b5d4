"""The blocks-per-step knob, bf16 compute, and a training loop with no hidden host work."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax import data, dt, trainer
from noprop_jax.config import Config, parse_mesh

DIGITS = data.load("digits")
BASE = dict(dataset="digits", T=4, batch_size=64)


def _steps(cfg, n=3):
  step = jax.jit(lambda s, x, y: dt.parallel_step(cfg, s, x, y))
  state = dt.init(cfg, jax.random.key(0))
  for i in range(n):
    sl = slice(64 * i, 64 * (i + 1))
    state, m = step(state, DIGITS.train.images[sl], DIGITS.train.labels[sl])
  return state, m


# All T vmapped is compared on 8 devices in test_mesh.py, and against unroll in test_dt.py.
SETTINGS = [dict(formulation="unroll", blocks_per_step=2), dict(formulation="vmap", blocks_per_step=2),
            dict(formulation="scan")]


def test_every_blocks_per_step_setting_trains_to_the_same_parameters():
  """Chunks of k blocks (vmapped or unrolled, the chunks scanned) only reorder floats."""
  ref, m_ref = _steps(Config.create(**BASE, formulation="unroll"))
  assert Config.create(**BASE, formulation="unroll").resolved_blocks_per_step() == 4
  for kw in SETTINGS:
    cfg = Config.create(**BASE, **kw)
    state, m = _steps(cfg)
    for path, a in jax.tree_util.tree_leaves_with_path(ref):
      b = dict(jax.tree_util.tree_leaves_with_path(state))[path]
      scale = float(np.abs(np.asarray(a, np.float64)).max())
      if scale < 1e-3:
        # Biases whose constant shift a later BatchNorm removes get a zero gradient up to
        # float noise; Adam turns that noise into steps of up to ~1e-4: not comparable. Trained
        # parameters move ~lr = 1e-3 per step; those biases also shift BatchNorm means by
        # ~1e-4 of their scale, and Adam amplifies float noise in any near-zero gradient
        # component to a step of up to lr, hence 2e-3 of the scale plus 1% of one step.
        continue
      np.testing.assert_allclose(b, a, rtol=0, atol=2e-3 * scale + 1e-5,
                                 err_msg=f"{kw}: {jax.tree_util.keystr(path)}")
    np.testing.assert_allclose(m["block_loss"], m_ref["block_loss"], rtol=1e-4)


def test_chunks_reach_every_block_once():
  """Blocks-per-step 2 of T=4: every block's parameters change, each by its own gradient."""
  cfg = Config.create(**BASE, formulation="vmap", blocks_per_step=2)
  s0 = dt.init(cfg, jax.random.key(0))
  s1, m = _steps(cfg, n=1)
  k0 = s0["blocks"]["params"]["image"]["Conv_0"]["kernel"]
  k1 = s1["blocks"]["params"]["image"]["Conv_0"]["kernel"]
  assert all(not np.allclose(k0[i], k1[i]) for i in range(4))
  assert len(set(np.asarray(m["block_loss"]).round(6))) == 4  # four different losses


@pytest.mark.parametrize("kw, match", [
    (dict(blocks_per_step=3), "blocks_per_step must divide T=4"),
    (dict(blocks_per_step=5), "blocks_per_step must divide T=4"),
    (dict(formulation="scan", blocks_per_step=2), "one block at a time"),
    (dict(method="ct", blocks_per_step=2), "NoProp-DT's"),
    (dict(mesh="blocks=3"), "blocks=3 must divide T=4"),
    (dict(mesh="blocks=2", blocks_per_step=1), "multiple of the mesh's blocks=2"),
    (dict(mesh="blocks=2", formulation="unroll"), "use vmap"),
    (dict(mesh="blocks=2", training="sequential"), "data=N"),
    (dict(mesh="blocks=2", method="fm"), "use data=N"),
    (dict(mesh="data=3"), "divisible by the mesh's data=3"),
    (dict(precision="float16"), "unknown precision"),
    (dict(method="backprop", precision="bfloat16"), "not backprop"),
])
def test_bad_parallel_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    Config.create(**{**BASE, **kw})


@pytest.mark.parametrize("spec, match", [("blocks:2", "blocks=B,data=D"), ("model=2", "axes"),
                                         ("data=two", "whole number"), ("data=0", ">= 1")])
def test_bad_mesh_specs_are_named(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_mesh(spec)
  assert parse_mesh(" blocks=4, data=2 ") == {"blocks": 4, "data": 2}
  assert parse_mesh("") == {"blocks": 1, "data": 1}


def test_mesh_larger_than_the_devices_is_an_error():
  from noprop_jax.sharding import make_mesh
  n = len(jax.devices())
  with pytest.raises(ValueError, match=f"needs {2 * n} devices"):
    make_mesh(Config.create(**{**BASE, "batch_size": 64 * n, "mesh": f"data={2 * n}"}))


def test_auto_blocks_per_step_takes_the_largest_that_fits():
  cfg = Config.create(**BASE, formulation="vmap")
  n = len(DIGITS.train.labels)
  x, y = jax.device_put(DIGITS.train.images), jax.device_put(DIGITS.train.labels)
  state = dt.init(cfg, jax.random.key(0))
  # XLA:CPU reports no memory limit: all T at once.
  got, _ = trainer.fit_blocks_per_step(cfg, n, state, x, y)
  assert got.blocks_per_step == 4
  need = {k: trainer._peak_bytes(trainer.make_epoch_step(
      dataclasses.replace(cfg, blocks_per_step=k), n).lower(state, x, y).compile()) for k in (4, 2, 1)}
  assert need[1] < need[2] < need[4]
  got, step = trainer.fit_blocks_per_step(cfg, n, state, x, y, limit_bytes=(need[2] + need[4]) / 2)
  assert got.blocks_per_step == 2
  state, m = step(state, x, y)  # the compiled step it returns runs
  assert np.isfinite(float(m["loss"]))
  with pytest.raises(MemoryError, match="k=1 needs"):
    trainer.fit_blocks_per_step(cfg, n, state, x, y, limit_bytes=need[1] / 2)


def test_bfloat16_computes_in_bf16_and_keeps_float32_state():
  cfg = Config.create(**BASE, formulation="vmap", precision="bfloat16")
  x, y = DIGITS.train.images[:64], DIGITS.train.labels[:64]
  state = dt.init(cfg, jax.random.key(0))
  jaxpr = str(jax.make_jaxpr(lambda s: dt.parallel_step(cfg, s, x, y))(state))
  assert "bf16[" in jaxpr and "dot_general" in jaxpr
  s16, m16 = _steps(cfg)
  s32, m32 = _steps(dataclasses.replace(cfg, precision="float32"))
  for leaf in jax.tree.leaves(s16):
    assert leaf.dtype != jnp.bfloat16
  # Same run up to bf16 rounding: close, but not equal.
  np.testing.assert_allclose(m16["block_loss"], m32["block_loss"], rtol=0.1)
  assert not np.array_equal(m16["block_loss"], m32["block_loss"])


def test_training_loop_has_no_hidden_host_transfers_and_compiles_each_step_once(tmp_path, traces):
  """All of `train` (steps, logging, checkpoints, evaluation) under transfer_guard('disallow');
  three epochs trace no more functions than one (nothing recompiles per epoch or step)."""
  lines = []
  kw = dict(dataset=DIGITS, progress=False, print_fn=lines.append, log_every=3,
            checkpoint_every=5)
  cfg = Config.create(dataset="digits", T=2, inference_runs=2, epochs=1)
  counts = {}
  for epochs in (1, 3):
    jax.clear_caches()
    traces.clear()
    with jax.transfer_guard("disallow"):
      s = trainer.train(dataclasses.replace(cfg, epochs=epochs), tmp_path / str(epochs), **kw)
    counts[epochs] = collections.Counter(traces)
  assert counts[3]["step"] == 1  # the training step, over 33 steps and 3 epochs
  assert counts[3]["evaluate"] == 2  # the test split and the train subset (two sizes)
  assert counts[3] == counts[1], "more epochs must not compile anything more"
  assert s["steps"] == 33 and np.isfinite(s["test_accuracy"])
  assert "NoProp-DT" in lines[0] and "T=2" in lines[0] and "2 blocks per step" in lines[0]
  assert s["blocks_per_step"] == 2 and s["precision"] == "float32"
