"""The blocks-per-step knob, bf16 compute, and a training loop with no hidden host work."""

import collections
import dataclasses
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees, build, reordering_atol
from noprop_jax import core, dt, trainer
from noprop_jax.config import RunConfig, parse_mesh

BASE = dict(dataset="digits", T=4, batch_size=64)


def _cfg(**kw):
  return RunConfig.create(**{**BASE, **kw})


def _steps(digits, cfg, n=3):
  compute, model = build(cfg)
  step = jax.jit(partial(dt.train_step, model, cfg.train.optim, compute))
  state = trainer.init_state(cfg, model, jax.random.key(0))
  for i in range(n):
    sl = slice(64 * i, 64 * (i + 1))
    state, m = step(state, digits.train.images[sl], digits.train.labels[sl])
  return state, m


# Against all T at once (the reference: vmapped, which test_mesh.py compares on 8 devices, or
# unrolled); all T unrolled computes the same gradients as vmap and scan (test_dt.py).
SETTINGS = {"patches": ("vmap", [dict(formulation="unroll", blocks_per_step=2),
                                 dict(formulation="vmap", blocks_per_step=2), dict(formulation="scan")]),
            "gemm": ("unroll", [dict(formulation="unroll", blocks_per_step=2), dict(formulation="scan")])}


@pytest.mark.parametrize("conv_impl", SETTINGS)
def test_every_blocks_per_step_setting_takes_the_same_step(digits, conv_impl):
  """Chunks of k blocks (vmapped or unrolled, the chunks scanned; one block at a time in
  a scan) only reorder floats: from each state of a three-step reference run, every
  setting's step gives the reference's next state (parameters, optimizer state, BatchNorm
  statistics, key, count) and block losses.

  Step by step from the same states, not three steps each: the last block's Eq. 8 weight,
  SNR(T) - SNR(T-1) ~ 1e4, grows float differences of ~1e-6 to a few % of its parameters
  within three steps, by an amount that depends on how the compiler orders the sums.
  One convolution per test: 'auto' picks the patches one for vmapped blocks and the GEMM
  one for blocks computed one by one, whose float differences would add to that."""
  assert trainer.resolve_compute(_cfg(formulation="unroll")).blocks_per_step == 4
  assert trainer.resolve_compute(_cfg(formulation="scan")).blocks_per_step == 1

  def stepper(cfg):
    compute, model = build(cfg)
    return jax.jit(partial(dt.train_step, model, cfg.train.optim, compute))

  batches = [(digits.train.images[64 * i:64 * (i + 1)], digits.train.labels[64 * i:64 * (i + 1)])
             for i in range(3)]
  ref_formulation, settings = SETTINGS[conv_impl]
  cfg = _cfg(formulation=ref_formulation, conv_impl=conv_impl)
  ref, ref_step = [(trainer.init_state(cfg, build(cfg)[1], jax.random.key(0)), None)], stepper(cfg)
  for x, y in batches:
    ref.append(ref_step(ref[-1][0], x, y))
  for kw in settings:
    step = stepper(_cfg(conv_impl=conv_impl, **kw))
    for i, (x, y) in enumerate(batches):
      state, m = step(ref[i][0], x, y)
      want, m_want = ref[i + 1]
      # Equal up to float reordering, leaf by leaf.
      assert_trees(state, want, atol=reordering_atol, what=f"{kw} step {i}")
      np.testing.assert_allclose(m["block_loss"], m_want["block_loss"], rtol=1e-4)


def test_auto_picks_the_convolution_by_how_the_blocks_are_mapped():
  """On XLA:CPU 'auto' gives blocks computed one by one (all T or chunks unrolled, one at a
  time in a scan) the GEMM convolution, and vmapped chunks the patches one; GPU/TPU get
  the stock convolution."""
  def impl(backend="cpu", **kw):
    cfg = _cfg(**kw)
    return build(cfg, backend=backend)[1].block.conv_impl

  assert impl(formulation="unroll") == impl(formulation="unroll", blocks_per_step=2) == "gemm"
  assert impl(formulation="scan") == impl(formulation="vmap", blocks_per_step=1) == "gemm"
  assert impl(formulation="vmap") == impl(formulation="vmap", blocks_per_step=2) == "patches"
  assert impl("gpu", formulation="scan") == impl("tpu", formulation="unroll") == "xla"


def test_chunks_reach_every_block_once(digits):
  """Blocks-per-step 2 of T=4: every block's parameters change, each by its own gradient."""
  cfg = _cfg(formulation="vmap", blocks_per_step=2)
  _, model = build(cfg)
  s0 = trainer.init_state(cfg, model, jax.random.key(0))
  s1, m = _steps(digits, cfg, n=1)
  k0 = s0["blocks"]["params"]["image"]["Conv_0"]["kernel"]
  k1 = s1["blocks"]["params"]["image"]["Conv_0"]["kernel"]
  assert all(not np.allclose(k0[i], k1[i]) for i in range(4))
  assert len(set(np.asarray(m["block_loss"]).round(6))) == 4  # four different losses


def _no_T(kw):
  return {k: v for k, v in {**BASE, **kw}.items() if k != "T"}  # T is not every method's


@pytest.mark.parametrize("kw, match", [
    (dict(blocks_per_step=3), "blocks_per_step must divide T=4"),
    (dict(blocks_per_step=5), "blocks_per_step must divide T=4"),
    (dict(formulation="scan", blocks_per_step=2), "one block at a time"),
    (_no_T(dict(method="ct", blocks_per_step=2)), r"side by side in one step \(dt, diffusion_blocks\)"),
    (dict(mesh="blocks=3"), "blocks=3 must divide T=4"),
    (dict(mesh="blocks=2", blocks_per_step=1), "multiple of the mesh's blocks=2"),
    (dict(mesh="blocks=2", formulation="unroll"), "use vmap"),
    (dict(mesh="blocks=2", training="sequential"), "data=N"),
    (_no_T(dict(mesh="blocks=2", method="fm")), "use data=N"),
    (dict(mesh="data=3"), "divisible by the mesh's data=3"),
    (dict(precision="float16"), "unknown precision"),
    (dict(method="backprop", precision="bfloat16"), "not implemented by backprop; methods that "
     r"have it: \['dt', 'ct', 'fm', 'diffusion_blocks'"),
    # (and any method a test registered: the registry's, in registration order)
    ({**BASE, "method": "ct"}, "--T is a setting of dt, diffusion_blocks, local, backprop(, \\w+)*, not of ct"),
])
def test_bad_parallel_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    RunConfig.create(**(kw if "method" in kw else {**BASE, **kw}))


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
  cfg = _cfg(batch_size=64 * n, mesh=f"data={2 * n}")
  with pytest.raises(ValueError, match=f"needs {2 * n} devices"):
    make_mesh(cfg.train.mesh)
  assert make_mesh("") is None


def test_auto_blocks_per_step_takes_the_largest_that_fits(digits):
  # Batches of 256: activations, which grow with the blocks computed at once, dominate the
  # memory (at 64, the scan's own buffers can make chunks of 2 need more than all 4).
  cfg = _cfg(formulation="vmap", batch_size=256)
  n = len(digits.train.labels)
  x, y = jax.device_put(digits.train.images), jax.device_put(digits.train.labels)
  compute, model = build(cfg)
  state = trainer.init_state(cfg, model, jax.random.key(0))
  order = trainer.batch_order(state["rng"], state["step"], n, n // 256)
  # XLA:CPU reports no memory limit: all T at once.
  got, got_model, _ = trainer.fit_blocks_per_step(cfg, 10, n, state, x, y, order)
  assert got.blocks_per_step == 4 and got_model == model

  def need(k):
    c = dataclasses.replace(compute, blocks_per_step=k)
    m = trainer.build_model(cfg, x.shape[1:], 10, c)  # (this compute, not the config's)
    return core.peak_bytes(trainer.make_epoch_step(cfg, m, c, n).lower(state, x, y, order).compile())

  need = {k: need(k) for k in (4, 2, 1)}
  assert need[1] < need[2] < need[4]
  got, got_model, step = trainer.fit_blocks_per_step(cfg, 10, n, state, x, y, order,
                                                     limit_bytes=(need[2] + need[4]) / 2)
  assert got.blocks_per_step == 2 and got.formulation == "vmap"
  state, m = step(state, x, y, order)  # the compiled step it returns runs
  assert np.isfinite(float(m["loss"]))
  with pytest.raises(MemoryError, match="blocks_per_step 1 needs"):
    trainer.fit_blocks_per_step(cfg, 10, n, state, x, y, order, limit_bytes=need[1] / 2)


def test_evaluation_batch_is_fitted_to_memory_like_the_step(digits):
  """Evaluation runs many inference paths at once: its batch halves from 500 until the
  compiled evaluator fits, and the one it returns gives the same accuracies."""
  cfg = _cfg(T=2, block="mlp", hidden=32, inference_runs=3)
  compute, model = build(cfg)
  state = trainer.init_state(cfg, model, jax.random.key(0))
  x, y = jax.device_put(digits.train.images), jax.device_put(digits.train.labels)  # 1438
  key = jax.random.key(1)
  need = {b: core.peak_bytes(trainer.make_evaluator(cfg, model, compute, len(y), 3, b)
                             .lower(state, x, y, key).compile()) for b in (500, 250, 125)}
  assert need[125] < need[250] < need[500]
  whole = trainer.fit_evaluator(cfg, model, compute, 3, state, x, y, key)  # CPU: no limit
  fitted = trainer.fit_evaluator(cfg, model, compute, 3, state, x, y, key,
                                 limit_bytes=(need[125] + need[250]) / 2)
  acc_whole, runs_whole = whole(state, x, y, key)
  acc, runs = fitted(state, x, y, key)
  assert float(acc) == float(acc_whole)  # the mean path does not depend on the batching
  assert runs.shape == runs_whole.shape == (3,)
  assert core.peak_bytes(fitted) == need[125]
  with pytest.raises(MemoryError, match="evaluation batch 1 needs"):
    trainer.fit_evaluator(cfg, model, compute, 3, state, x, y, key, limit_bytes=1000)


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(digits):
  cfg = _cfg(T=2, formulation="vmap", precision="bfloat16")
  x, y = digits.train.images[:64], digits.train.labels[:64]
  compute, model = build(cfg)
  assert compute.precision == "bfloat16"
  state = trainer.init_state(cfg, model, jax.random.key(0))
  jaxpr = str(jax.make_jaxpr(lambda s: dt.train_step(model, cfg.train.optim, compute, s, x, y))(state))
  assert "bf16[" in jaxpr and "dot_general" in jaxpr
  s16, m16 = _steps(digits, cfg)
  s32, m32 = _steps(digits, _cfg(T=2, formulation="vmap", precision="float32"))
  for leaf in jax.tree.leaves(s16):
    assert leaf.dtype != jnp.bfloat16
  # Same run up to bf16 rounding: close, but not equal.
  np.testing.assert_allclose(m16["block_loss"], m32["block_loss"], rtol=0.1)
  assert not np.array_equal(m16["block_loss"], m32["block_loss"])


def test_training_loop_has_no_hidden_host_transfers_and_compiles_each_step_once(tmp_path, traces,
                                                                                digits):
  """All of `train` (steps, logging, checkpoints, evaluation) under transfer_guard('disallow');
  three epochs trace no more functions than one (nothing recompiles per epoch or step).
  (`traces`, not chex: every program the loop compiles is counted, not only the method's.)"""
  lines = []
  kw = dict(dataset=digits, progress=False, print_fn=lines.append, log_every=3,
            checkpoint_every=5)
  counts = {}
  for epochs in (1, 3):
    # The MLP block: the loop, not the block, is under test (the paper block's compiles
    # are exercised above).
    cfg = RunConfig.create(dataset="digits", T=2, inference_runs=2, epochs=epochs, block="mlp",
                           hidden=64)
    jax.clear_caches()
    traces.clear()
    with jax.transfer_guard("disallow"):
      s = trainer.train(cfg, tmp_path / str(epochs), **kw)
    counts[epochs] = collections.Counter(traces)
  assert counts[3]["step"] == 1  # the training step, over 33 steps and 3 epochs
  assert counts[3]["evaluate"] == 2  # the test split and the train subset (two sizes)
  assert counts[3] == counts[1], "more epochs must not compile anything more"
  assert s["steps"] == 33 and np.isfinite(s["test_accuracy"])
  assert "NoProp-DT" in lines[0] and "T=2" in lines[0] and "2 blocks per step" in lines[0]
  assert s["compute"]["blocks_per_step"] == 2 and s["compute"]["precision"] == "float32"


def test_precision_check_compares_paired_runs_with_their_seed_noise():
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
  import precision_check

  acc = {("ct", "float32"): [0.90, 0.80, 0.85], ("ct", "bfloat16"): [0.91, 0.83, 0.84]}
  rows = [{"method": m, "precision": p, "seed": s, "test_accuracy_mean_path": a}
          for (m, p), accs in acc.items() for s, a in enumerate(accs)]
  line = precision_check.table(rows, "test_accuracy_mean_path").splitlines()[1].split()
  # float32 0.85 ± 0.05, bfloat16 0.86 ± 0.0436; differences +0.01, +0.03, -0.01: mean
  # +0.01, standard error 0.02 / sqrt(3).
  assert line[:4] == ["ct", "0.8500", "±", "0.0500"]
  assert line[4:7] == ["0.8600", "±", "0.0436"]
  assert line[7:] == ["+0.0100", "±", "0.0115", "3"]
