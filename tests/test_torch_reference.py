"""The PyTorch yardstick of experiments/benchmark.py is the paper's block, trained as the
public PyTorch code trains it (skipped where torch is not installed: an optional extra)."""

import sys
from pathlib import Path

import jax
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import torch_reference as ref  # noqa: E402

from noprop_jax import blocks, core  # noqa: E402


def _jax_params(block, shape, *extra):
  x = jax.numpy.zeros((1, *shape))
  z = jax.numpy.zeros((1, 10))
  v = jax.eval_shape(lambda: core.init_block(block, jax.random.key(0), x, z, *extra))
  return core.count_params(v["params"])


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_the_torch_blocks_are_the_librarys_blocks(shape):
  h, _, c = shape
  assert ref.num_params(ref.DTBlock(c, h, 10, 10)) == _jax_params(blocks.DTBlock(10), shape)
  ct = _jax_params(blocks.CTBlock(10), shape, jax.numpy.zeros((1,)))
  assert ref.num_params(ref.CTBlock(c, h, 10, 10)) == ct


def test_a_block_step_changes_that_block_alone():
  model = ref.DT((28, 28, 1), 10, T=3)
  x, y = ref.batch((28, 28, 1), 10, 16)
  before = [[p.detach().clone() for p in b.parameters()] for b in model.blocks]
  model.block_step(1, x, y)
  changed = [any(not torch.equal(p, q) for p, q in zip(b.parameters(), old))
             for b, old in zip(model.blocks, before)]
  assert changed == [False, True, False]


def test_timers_run_and_predict_shapes():
  t = ref.timers((28, 28, 1), 10, batch_size=8, T=2, fm_batch=4, fm_steps=3)
  assert set(t) == {"step", "block_step", "dt_predict", "fm_predict"}
  for fn in t.values():
    fn()
  model = ref.DT((28, 28, 1), 10, T=2)
  assert model.predict(ref.batch((28, 28, 1), 10, 5)[0]).shape == (5, 10)
  assert ref.FM((28, 28, 1), 10, steps=2).predict(ref.batch((28, 28, 1), 10, 3)[0]).shape == (3, 10)


def test_the_benchmark_times_both_side_by_side(capsys):
  import json
  import time

  import benchmark
  T = 2
  t0 = time.perf_counter()
  assert benchmark.main(["--dataset", "mnist", "--T", str(T), "--batch-size", "8", "--repeats", "1",
                         "--rounds", "1", "--cases", "algorithm1", "--skip-inference", "--json",
                         "--torch-fm-batch", "2", "--torch-fm-steps", "3",
                         "--matmul-size", "256"]) == 0
  elapsed = time.perf_counter() - t0
  out = capsys.readouterr().out
  rows = {r["case"]: r for r in map(json.loads, (l for l in out.splitlines() if l.startswith("{")))
          if r["table"] == "torch"}
  assert set(rows) == {"step", "block_step", "dt_predict", "fm_predict"}
  for case, r in rows.items():
    # One round of one call each (a block step: one per block), timed within the run.
    assert r["timed_calls"] == (T if case == "block_step" else 1), r
    assert 0 < r["jax_s"] < elapsed and 0 < r["torch_s"] < elapsed, (r, elapsed)
    assert r["speedup"] == r["torch_s"] / r["jax_s"]
  # One block's step: at least its share of all T blocks' step, less than all of it.
  step, block_step = rows["step"]["flops_jax"], rows["block_step"]["flops_jax"]
  assert step / T <= block_step < step, (block_step, step)
  assert "Against PyTorch" in out and "training: one step of all T blocks" in out
