"""experiments/benchmark.py runs (shrunk: digits, T=2) and its rows add up;
experiments/inference_benchmark.py's whole-block inference matches the library's."""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import benchmark  # noqa: E402


def test_benchmark_rows(capsys):
  batch, T = 16, 2
  assert benchmark.main(["--dataset", "digits", "--T", str(T), "--batch-size", str(batch),
                         "--repeats", "1", "--json", "--inference-steps", "2", "--matmul-size", "1024",
                         "--cases", "vmap", "chunks", "algorithm1", "--no-torch"]) == 0
  out = capsys.readouterr().out
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  train = {r["case"]: r for r in rows if r["table"] == "train"}
  assert set(train) == {"vmap", "chunks1-scan", "algorithm1"}  # at T=2 the only chunks: of 1
  # The resolved settings are the library's: chunks of 1 scan vmapped single blocks.
  assert train["vmap"]["resolved"].startswith("vmap/2/") and train["chunks1-scan"]["resolved"].startswith("vmap/1/")
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


def test_inference_benchmark_whole_block_impls_match_the_library(capsys):
  """experiments/inference_benchmark.py's naive and per_step CT/FM inference (the whole
  block at every Euler step) give the library's (hoisted) scores."""
  import inference_benchmark as ib
  from noprop_jax import config, trainer

  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
  for method in ("ct", "fm"):
    cfg = config.RunConfig.create(method, dataset="digits", inference_steps=4)
    model = trainer.build_model(cfg, (8, 8, 1), 10, trainer.resolve_compute(cfg))
    state = trainer.init_state(cfg, model, jax.random.key(0))
    if method == "ct":  # CT's head starts at zero: give the scores something to rank
      head = state["params"]["head"]
      head["kernel"] = jax.random.normal(jax.random.key(2), head["kernel"].shape)
    key = jax.random.key(3)  # sampled z_0 (the mean path's z_0 = 0 is the main's, below)
    hoisted = ib.predict(model, state, x, 3, "hoisted", key, "stochastic")
    for impl in ("naive", "per_step"):
      np.testing.assert_allclose(ib.predict(model, state, x, 3, impl, key, "stochastic"), hoisted,
                                 rtol=1e-4, atol=1e-4, err_msg=f"{method} {impl}")
  # Untrained FM, mean path, timing only: one row per step count, with the same predictions.
  assert ib.main(["--method", "fm", "--dataset", "digits", "--steps", "3", "--time-images", "16",
                  "--json"]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert row["steps"] == 3 and row["same_predictions"] == 1.0 and row["test_accuracy"] is None
  assert min(row[f"{k}_ms_per_image"] for k in ib.IMPLS) > 0
