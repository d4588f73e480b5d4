"""experiments/benchmark.py runs (shrunk: digits, T=2) and its rows add up."""

import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import benchmark  # noqa: E402


def test_benchmark_rows(capsys):
  batch, T = 16, 2
  assert benchmark.main(["--dataset", "digits", "--T", str(T), "--batch-size", str(batch),
                         "--repeats", "1", "--json", "--inference-steps", "2", "--matmul-size", "1024",
                         "--cases", "vmap", "chunks", "algorithm1"]) == 0
  out = capsys.readouterr().out
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  train = {r["case"]: r for r in rows if r["table"] == "train"}
  assert set(train) == {"vmap", "chunks1-scan", "algorithm1"}  # at T=2 the only chunks: of 1
  assert "one block per step (Algorithm 1)" in out and "NoProp-FM" in out
  cpu = jax.default_backend() == "cpu"
  for r in train.values():
    assert "error" not in r, r
    assert r["examples_per_s"] > 0 and r["compile_s"] > 0
    assert r["flops"] > 0 and 0 < r["frac_matmul_peak"] < 5
    if cpu:
      assert r["xla_temp_mib"] > 0 and r["xla_peak_mib"] > 0 and r["device_peak_mib"] is None
  # A chunked step's loop body counts once in XLA's FLOPs: it reports vmap's (same arithmetic).
  assert train["chunks1-scan"]["flops"] == train["vmap"]["flops"] > train["chunks1-scan"]["flops_xla"]
  a1 = train["algorithm1"]
  assert abs(a1["examples_per_s"] * T * a1["s_per_step"] / batch - 1) < 1e-6
  assert a1["x_algorithm1"] == 1.0 and train["vmap"]["temp_x_vmap"] == 1.0
  inference = {r["case"]: r for r in rows if r["table"] == "inference"}
  assert set(inference) == {"dt", "ct", "fm"}
  assert inference["fm"]["solver_steps"] == 2
  assert all(r["examples_per_s"] > 0 and r["compile_s"] > 0 for r in inference.values())
