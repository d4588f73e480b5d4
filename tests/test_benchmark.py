"""experiments/benchmark.py runs (shrunk: digits, T=2) and its rows add up;
experiments/inference_benchmark.py's whole-block inference matches the library's."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import benchmark  # noqa: E402
import render_results  # noqa: E402
from conftest import build  # noqa: E402

MiB = 2**20


def test_benchmark_rows(capsys):
  batch, T, repeats = 16, 2, 1
  t0 = time.perf_counter()
  assert benchmark.main(["--dataset", "digits", "--T", str(T), "--batch-size", str(batch),
                         "--repeats", str(repeats), "--rounds", "2", "--json", "--inference-steps", "2",
                         "--matmul-size", "1024", "--cases", "vmap", "chunks", "algorithm1",
                         "--no-torch"]) == 0
  elapsed = time.perf_counter() - t0  # every row's compiling and timing happened within it
  out = capsys.readouterr().out
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  train = {r["case"]: r for r in rows if r["table"] == "train"}
  assert set(train) == {"vmap", "chunks1-scan", "algorithm1"}  # at T=2 the only chunks: of 1
  # The resolved settings are the library's: chunks of 1 are the scan, one block at a time.
  assert train["vmap"]["resolved"].startswith("vmap/2/") and train["chunks1-scan"]["resolved"].startswith("scan/1/")
  assert "one block per step (Algorithm 1)" in out and "NoProp-FM" in out
  cpu = jax.default_backend() == "cpu"
  a1, vmap = train["algorithm1"], train["vmap"]
  for r in train.values():
    assert "error" not in r, r
    # The derived numbers are the measured step time's: an Algorithm 1 step trains one
    # block, so every block sees the batch once in T of its steps.
    s, passes = r["s_per_step"], (T if r is a1 else 1)
    assert r["timed_steps"] == 2 * repeats * passes and r["rounds"] == 2
    assert r["ms_per_step"] == pytest.approx(1e3 * s) and r["steps_per_s"] == pytest.approx(1 / s)
    assert r["examples_per_s"] == pytest.approx(batch / (passes * s))
    assert r["x_algorithm1"] == pytest.approx(r["examples_per_s"] / a1["examples_per_s"])
    # Compiling and the timed steps (in the row's own process) took part of the run's time.
    assert 0 < r["compile_s"] and 0 < r["compile_s"] + r["timed_steps"] * s < elapsed, (r, elapsed)
    assert r["flops_per_s"] == pytest.approx(r["flops"] / s)
    assert r["frac_matmul_peak"] == pytest.approx(r["flops"] / s / r["matmul_peak_flops_per_s"])
    assert r["frac_matmul_peak"] < 5
    if cpu:
      # XLA's memory analysis: peak = arguments + outputs - aliased + temp >= temp.
      assert 0 < r["xla_temp_bytes"] <= r["xla_peak_bytes"] and r["device_peak_mib"] is None
      assert r["xla_temp_mib"] == r["xla_temp_bytes"] / MiB and r["xla_peak_mib"] == r["xla_peak_bytes"] / MiB
      assert r["temp_x_vmap"] == pytest.approx(r["xla_temp_bytes"] / vmap["xla_temp_bytes"])
  # A chunked step's loop body counts once in XLA's FLOPs: it reports vmap's (same arithmetic).
  assert train["chunks1-scan"]["flops"] == vmap["flops"] > train["chunks1-scan"]["flops_xla"]
  assert vmap["flops"] == vmap["flops_xla"] and a1["flops"] == a1["flops_xla"]  # no loops
  # One block's step: at least its share of all T blocks' step (the shared head's work is
  # in both), less than all of it.
  assert vmap["flops"] / T <= a1["flops"] < vmap["flops"], (a1["flops"], vmap["flops"])
  assert a1["s_per_T_steps"] == pytest.approx(T * a1["s_per_step"])
  assert a1["x_algorithm1"] == 1.0 and vmap["temp_x_vmap"] == 1.0
  inference = {r["case"]: r for r in rows if r["table"] == "inference"}
  assert set(inference) == {"dt", "ct", "fm"}
  assert inference["fm"]["solver_steps"] == inference["ct"]["solver_steps"] == 2
  assert inference["dt"]["solver_steps"] == T
  for r in inference.values():
    s = r["s_per_batch"]
    assert r["ms_per_batch"] == pytest.approx(1e3 * s)
    assert r["examples_per_s"] == pytest.approx(batch / s)
    assert r["ms_per_solver_step"] == pytest.approx(1e3 * s / r["solver_steps"])
    assert 0 < r["compile_s"] and 0 < r["compile_s"] + repeats * s < elapsed, (r, elapsed)


def test_benchmark_rows_take_turns_round_by_round(monkeypatch):
  # Every row is compiled first, then each round times every row once, in order, so that
  # the machine's drift moves them alike; a row's time is the median over all its rounds.
  calls = []

  def prepare(key, kind, cfg):
    row = {"case": key}
    def time_steps(n):
      calls.append((key, n))
      return [float(len(calls))] * n
    calls.append((key, "compiled"))
    return row, time_steps

  monkeypatch.setattr(benchmark, "prepare_row", prepare)
  monkeypatch.setattr(benchmark, "device_peak", lambda: None)
  cfg = type("Cfg", (), {"T": 3})()
  rows = benchmark.train_rows([("a", "parallel", cfg), ("b", "algorithm1", cfg)], repeats=2, rounds=3)
  assert calls == [("a", "compiled"), ("b", "compiled")] + [("a", 2), ("b", 6)] * 3
  a, b = rows
  assert (a["timed_steps"], b["timed_steps"]) == (6, 18) and a["rounds"] == b["rounds"] == 3
  # a's rounds were timed at calls 3, 5, 7: seconds 3, 5, 7, twice each.
  for r, (lo, mid, hi) in ((a, (3.0, 5.0, 7.0)), (b, (4.0, 6.0, 8.0))):
    assert (r["s_min"], r["s_median"], r["s_max"]) == (lo, mid, hi) and r["s_per_step"] == mid


def _row(case, resolved, s, kind="parallel", **kw):
  return {"case": case, "kind": kind, "resolved": resolved, "s_per_step": s, **kw}


@pytest.mark.parametrize("rows, picked, fastest, ratio", [
    # auto's configuration measured twice (a process per row): one program, its faster timing
    # counts, so the noise between the two never reads as a wrong pick.
    ([_row("unroll", "unroll/4/gemm", 1.0), _row("vmap", "vmap/4/patches", 1.05),
      _row("auto", "unroll/4/gemm", 1.2)], "unroll/4/gemm", "unroll", 1.0),
    # another configuration 20% faster than auto's: not within 10%.
    ([_row("vmap", "vmap/4/xla", 1.0), _row("scan", "scan/1/xla", 1.2),
      _row("auto", "scan/1/xla", 1.25)], "scan/1/xla", "vmap", 1.2),
    # rows that failed and rows of other kinds do not count.
    ([_row("vmap", "vmap/4/xla", 0.5, error="out of memory"), _row("algorithm1", "unroll/1/xla", 0.1,
      kind="algorithm1"), _row("unroll", "unroll/4/xla", 1.1), _row("auto", "vmap/4/xla", 1.0)],
     "vmap/4/xla", "auto", 1.0),
])
def test_auto_is_checked_against_the_fastest_configuration(rows, picked, fastest, ratio):
  check = benchmark.auto_check(rows)
  assert (check["picked"], check["fastest"]) == (picked, fastest)
  assert check["auto_over_fastest"] == pytest.approx(ratio)
  assert check["within"] == (ratio <= 1.1)


def test_inference_benchmark_whole_block_impls_match_the_library(capsys):
  """experiments/inference_benchmark.py's naive and per_step CT/FM inference (the whole
  block at every Euler step) give the library's (hoisted) scores."""
  import inference_benchmark as ib
  from noprop_jax import config, trainer

  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
  for method in ("ct", "fm"):
    cfg = config.RunConfig.create(method, dataset="digits", inference_steps=4)
    model = build(cfg)[1]
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
  t0 = time.perf_counter()
  assert ib.main(["--method", "fm", "--dataset", "digits", "--steps", "3", "--time-images", "16",
                  "--json"]) == 0
  elapsed = time.perf_counter() - t0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert row["steps"] == 3 and row["same_predictions"] == 1.0 and row["test_accuracy"] is None
  # The speedups are the timings' ratios; each timed batch of 16 took part of the run's time.
  ms = {k: row[f"{k}_ms_per_image"] for k in ib.IMPLS}
  assert row["speedup_vs_per_step"] == pytest.approx(ms["per_step"] / ms["hoisted"])
  assert row["speedup_vs_naive"] == pytest.approx(ms["naive"] / ms["hoisted"])
  assert 0 < sum(16 * v / 1e3 for v in ms.values()) < elapsed, (ms, elapsed)


def test_memory_benchmark_has_the_rematerialised_backprop_row_and_every_backprop_case_runs(capsys):
  import memory_benchmark

  memory_benchmark.main(["--dataset", "digits", "--batch-size", "16", "--methods", "backprop",
                         "--adjoint-steps", "2", "--json", "--time-repeats", "2"])
  out = capsys.readouterr().out
  rows = {r.get("case") or r["table"]: r for r in (json.loads(l) for l in out.splitlines()
                                                if l.startswith("{"))}
  remat = "backprop, rematerialised per block"
  cost = rows.pop("remat_cost")
  assert set(rows) == {"backprop", remat, "backprop through the solve/2 steps"}, rows
  assert rows["backprop"]["ratio_to_backprop"] == 1.0 and rows[remat]["ratio_to_remat"] == 1.0
  for r in rows.values():  # both ratios side by side, each of the same peaks
    assert r["temp"] > 0
    assert r["ratio_to_backprop"] == pytest.approx(r["peak"] / rows["backprop"]["peak"])
    assert r["ratio_to_remat"] == pytest.approx(r["peak"] / rows[remat]["peak"])
  # rematerialisation's step-time cost, from the two steps timed alternately
  for k in ("backprop", "remat"):
    assert 0 < cost[f"{k}_s_min"] <= cost[f"{k}_s_median"] <= cost[f"{k}_s_max"]
  assert cost["remat_over_backprop"] == pytest.approx(cost["remat_s_median"] / cost["backprop_s_median"])
  assert "rematerialisation costs" in out


def test_accelerator_benchmark_runs_tiny_and_writes_its_results(tmp_path):
  """The accelerator benchmark's one command, at tiny sizes on this backend: every row of
  every section, the auto check, timings as min <= median <= max, the results file's
  provenance, and the T-curve plot."""
  out = tmp_path / "acc.json"
  script = Path(__file__).resolve().parents[1] / "experiments" / "accelerator_benchmark.py"
  p = subprocess.run([sys.executable, str(script), "--tiny", "--precisions", "bfloat16",
                      "--t-curve", "mnist:float32", "--no-torch", "--out", str(out)],
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["command"].startswith("python experiments/accelerator_benchmark.py --tiny")
  assert res["machine"]["backend"] == jax.default_backend() and res["machine"]["cores"] >= 1
  assert {"jax", "jaxlib", "flax", "optax", "numpy", "python"} <= set(res["versions"])
  assert res["settings"]["T"] == 2 and res["settings"]["batch_size"] == 8
  rows = res["rows"]
  assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
  train = {r["case"]: r for r in rows if r["table"] == "train"}
  assert set(train) == {"vmap", "unroll", "chunks1-scan", "auto", "algorithm1", "backprop",
                        "backprop-remat"}
  for r in train.values():
    assert r["precision"] == "bfloat16" and r["dataset"] == "mnist" and r["T"] == 2
    assert 0 < r["s_min"] <= r["s_median"] <= r["s_max"]
    per = 2 if r["case"] == "algorithm1" else 1  # T of Algorithm 1's steps = one parallel step
    assert r["s_per_T_updates_median"] == pytest.approx(per * r["s_median"])
    assert r["examples_per_s"] == pytest.approx(8 / r["s_per_T_updates_median"])
    assert r["xla_peak_bytes"] > 0
  assert train["backprop-remat"]["resolved"].startswith("chain-scan/")
  auto = next(r for r in rows if r["table"] == "auto")
  # auto's configuration against the fastest one measured (benchmark.auto_check's own test
  # has the cases).
  fastest = min((r for r in train.values() if r["kind"] == "parallel"), key=lambda r: r["s_per_step"])
  assert auto["fastest_resolved"] == fastest["resolved"] and auto["auto_over_fastest"] >= 1
  assert auto["within"] == (auto["auto_over_fastest"] <= 1.1)
  assert {r["case"] for r in rows if r["table"] == "inference"} == {"dt", "ct", "fm"}
  curve = [(r["T"], r["case"], r["precision"]) for r in rows if r["table"] == "t_curve"]
  assert sorted(curve) == [(T, c, "float32") for T in (1, 2) for c in ("algorithm1", "auto")]
  # Every training row over --rounds (default 2) rounds of --repeats (tiny: 2) calls, x T for
  # Algorithm 1.
  for r in rows:
    if r["table"] in ("train", "t_curve"):
      assert r["rounds"] == 2 and r["timed_steps"] == 2 * 2 * (r["T"] if r["kind"] == "algorithm1" else 1), r
  assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The documentation's tables of it: every training row with its time per T block updates
  # and its throughput over Algorithm 1's, the auto check, and the speed-up at each T.
  page = render_results.renderer(res, "acc.json")(res)
  a1 = train["algorithm1"]["s_per_T_updates_median"]
  for r in train.values():
    assert (f"| mnist | bfloat16 | {r['name']} | {r['resolved']} | "
            f"{1e3 * r['s_per_T_updates_median']:.1f} (") in page
    assert f") | {a1 / r['s_per_T_updates_median']:.2f} |" in page
  assert f"auto took {auto['auto_over_fastest']:.2f}x its time" in page
  at = {(r["T"], r["case"]): r["s_per_T_updates_median"] for r in rows if r["table"] == "t_curve"}
  for T in (1, 2):
    assert f"| mnist | float32 | {T} | " in page
    assert f" | {at[T, 'algorithm1'] / at[T, 'auto']:.2f}x |" in page


def test_accelerator_benchmark_rows_from_a_process_of_their_own():
  """Where the device reports its peak (GPU/TPU) every training row runs in a fresh process:
  that path, on this backend, gives the rows the in-process path gives; a row that fails
  there becomes an error row instead of ending the benchmark."""
  import accelerator_benchmark as acc

  unit = dict(dataset="mnist", precision="float32", batch_size=4, T=2, repeats=1, rounds=1,
              inference_steps=2, what="train", case="algorithm1")
  [row] = acc._child(unit)
  assert "error" not in row, row
  assert row["case"] == "algorithm1" and row["resolved"].endswith("/1/gemm" if jax.default_backend() == "cpu" else "/1/xla")
  assert 0 < row["s_min"] <= row["s_median"] <= row["s_max"]
  assert row["s_per_T_updates_median"] == pytest.approx(2 * row["s_median"])
  [bad] = acc._child(dict(unit, case="no-such-case"))
  assert bad["error"] and bad["case"] == "no-such-case" and bad["dataset"] == "mnist"
