"""experiments/compare.py: a row trains, and its table entry holds what the README reports."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import compare  # noqa: E402


def test_a_row_trains_and_is_tabled_with_memory_and_block_calls(tmp_path, capsys):
  argv = ["--methods", "fm", "--blocks", "vit", "--epochs", "1", "--inference-steps", "3",
          "--out", str(tmp_path)]
  assert compare.main(argv) == 0
  (r,) = json.loads((tmp_path / "results.json").read_text())
  assert (r["method"], r["block"], r["block_calls"], r["epochs"]) == ("fm", "vit", 3, 1)
  assert 0 <= r["test_accuracy"] <= 1 and r["seconds_per_epoch"] > 0
  assert r["step_memory_bytes"] > 4 * r["params_per_block"]  # parameters, Adam moments, activations
  md = (tmp_path / "results.md").read_text()
  assert "| NoProp-FM | vit |" in md and "compare.py --methods fm" in md
  capsys.readouterr()
  # Finished rows are tabled again without training; rows never run are left out.
  assert compare.main(["--report-only", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "| NoProp-FM | vit |" in out and "| NoProp-DT |" not in out


def test_bad_budget_is_refused(capsys):
  assert compare.main(["--epochs", "0"]) == 2
  assert "--epochs must be >= 1" in capsys.readouterr().err
