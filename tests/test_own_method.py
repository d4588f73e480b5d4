"""A method of one's own, defined outside the package (`own_method.py`, NoProp-DT with
noise prediction) and registered from outside: it trains through `trainer.train`, resumes
exactly after a kill, runs from the command line and gets rows in the comparison and
benchmark scripts, with nothing under noprop_jax/ knowing it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import pytest

from noprop_jax import method as methods
from noprop_jax.config import RunConfig
from noprop_jax.trainer import load_run, train

import own_method
from conftest import Killed, killed_after

# Registered only while this module's tests run (`_own_method`): see test_contract.py.
if own_method.METHOD.name in methods.names():
  methods.unregister(own_method.METHOD.name)

ROOT = Path(__file__).resolve().parents[1]
MODULE = str(Path(own_method.__file__).resolve())
sys.path.insert(0, str(ROOT / "experiments"))
import benchmark  # noqa: E402
import compare  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def _own_method():
  methods.register(own_method.METHOD, replace=True)
  yield
  methods.unregister(own_method.METHOD.name)


SETTINGS = dict(block="mlp", hidden=256, depth=1, epochs=2, batch_size=128, inference_runs=1)
FLAGS = ["--block", "mlp", "--hidden", "256", "--depth", "1", "--epochs", "2", "--batch-size",
         "128", "--inference-runs", "1"]


def test_it_trains_resumes_exactly_and_runs_from_the_command_line(tmp_path, digits):
  assert methods.get("dt_eps") is own_method.METHOD
  cfg = RunConfig.create("dt_eps", **SETTINGS)
  quiet = dict(dataset=digits, progress=False, print_fn=lambda s: None, checkpoint_every=4)
  full = train(cfg, tmp_path / "full", **quiet)
  assert full["test_accuracy"] >= 0.7, full  # chance is 0.1; 0.83 on XLA:CPU
  assert full["params_per_block"] == own_method.METHOD.num_block_params(load_run(tmp_path / "full")[2])
  with killed_after(14), pytest.raises(Killed):  # mid epoch 2 (11 steps an epoch)
    train(cfg, tmp_path / "cut", **quiet)
  assert load_run(tmp_path / "cut")[3] == 12
  # The same run resumed by the command line, which imports the module that registers it.
  out = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "train.py"), "--method-module", MODULE,
       "--method", "dt_eps", *FLAGS, "--checkpoint-every", "4", "--workdir", str(tmp_path / "cut"),
       "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=os.environ)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "NoProp-DT, noise prediction on digits" in out.stdout
  assert "resuming from checkpoint at step 12" in out.stdout
  (_, _, a, sa), (_, _, b, sb) = load_run(tmp_path / "full"), load_run(tmp_path / "cut")
  assert sa == sb == 22
  chex.assert_trees_all_equal(a, b)  # exact resume
  summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
  assert summary["test_accuracy"] == full["test_accuracy"]
  # Its settings have flags, with its help; an unknown method names the way to register one.
  help_ = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), "--method-module",
                          MODULE, "--help"], capture_output=True, text=True, cwd=ROOT)
  text = " ".join(help_.stdout.split())  # argparse wraps lines
  assert "--noise-weight NOISE_WEIGHT w: every block's weight in the noise loss (dt_eps 1.0)" in text
  assert "dt_eps (NoProp-DT, noise prediction)" in text
  bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), "--method",
                        "dt_eps", "--workdir", str(tmp_path / "x")], capture_output=True, text=True,
                       cwd=ROOT)
  assert bad.returncode == 2 and "--method-module" in bad.stderr, bad.stderr


def test_it_gets_rows_in_the_comparison_and_the_benchmark(tmp_path, capsys):
  argv = ["--method-module", MODULE, "--methods", "dt_eps", "--blocks", "vit", "--epochs", "1",
          "--out", str(tmp_path)]
  assert compare.main(argv) == 0
  (r,) = json.loads((tmp_path / "results.json").read_text())
  s = json.loads((tmp_path / "runs" / "dt_eps_vit" / "summary.json").read_text())
  assert (r["method"], r["block"], r["block_calls"]) == ("dt_eps", "vit", 4)
  assert r["test_accuracy"] == s["test_accuracy_mean_path"]
  assert "| NoProp-DT, noise prediction | vit |" in (tmp_path / "results.md").read_text()
  capsys.readouterr()
  assert benchmark.main(["--method-module", MODULE, "--methods", "dt_eps", "--cases", "method-dt_eps",
                         "--dataset", "digits", "--T", "2", "--batch-size", "16", "--repeats", "1",
                         "--matmul-size", "256", "--json", "--no-torch", "--skip-inference"]) == 0
  out = capsys.readouterr().out
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  (row,) = [r for r in rows if r["case"] == "method-dt_eps"]
  assert "error" not in row and row["name"] == "NoProp-DT, noise prediction (its step)"
  assert row["examples_per_s"] == pytest.approx(16 / row["s_per_step"])
