"""experiments/compare.py: a row trains, and its table entry holds what the documentation reports."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import compare  # noqa: E402
from noprop_jax import method as methods  # noqa: E402
from noprop_jax import trainer  # noqa: E402


def test_a_row_trains_and_is_tabled_with_memory_and_block_calls(tmp_path, capsys, digits):
  argv = ["--methods", "fm", "--blocks", "vit", "--epochs", "1", "--inference-steps", "3",
          "--out", str(tmp_path)]
  t0 = time.perf_counter()
  assert compare.main(argv) == 0
  elapsed = time.perf_counter() - t0
  (r,) = json.loads((tmp_path / "results.json").read_text())
  assert (r["method"], r["block"], r["block_calls"], r["epochs"]) == ("fm", "vit", 3, 1)
  # The row's accuracy is its run's mean-path test accuracy: the summary's, the last
  # epoch's record's, and the checkpoint's predictions on the test split get it again.
  run = tmp_path / "runs" / "fm_vit"
  summary = json.loads((run / "summary.json").read_text())
  last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
  assert r["test_accuracy"] == summary["test_accuracy_mean_path"] == last["test_accuracy_mean_path"]
  _, model, state, _ = trainer.load_run(run)
  predicted = np.argmax(np.asarray(methods.get("fm").predict(model, state, digits.test.images)), -1)
  assert r["test_accuracy"] == pytest.approx(np.mean(predicted == digits.test.labels), abs=1e-6)
  # Its time per epoch: the epoch's own measured seconds, within the time the row took.
  assert r["seconds_per_epoch"] == pytest.approx(last["seconds"]) == summary["train_seconds"]
  assert 0 < r["seconds_per_epoch"] < elapsed
  assert r["step_memory_bytes"] > 4 * r["params_per_block"]  # parameters, Adam moments, activations
  md = (tmp_path / "results.md").read_text()
  assert f"| NoProp-FM | vit | {100 * r['test_accuracy']:.2f} |" in md and "compare.py --methods fm" in md
  # both accuracies, the mean path (the headline) and the sampled paths' mean, and what each is
  assert r["test_accuracy_stochastic"] == summary["test_accuracy_stochastic"]
  assert (f"| {100 * r['test_accuracy']:.2f} | {100 * r['test_accuracy_stochastic']:.2f} |" in md
          and "z ~ N(0, (1 + sigma_max^2) I)" in md and "the headline" in md)
  capsys.readouterr()
  # Finished rows are tabled again without training; rows never run are left out.
  assert compare.main(["--report-only", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "| NoProp-FM | vit |" in out and "| NoProp-DT |" not in out


def test_bad_budget_is_refused(capsys):
  assert compare.main(["--epochs", "0"]) == 2
  assert "--epochs must be >= 1" in capsys.readouterr().err
