"""experiments/reproduce.py: row selection, the results table on fake run directories, the
plots on random arrays, and one short end-to-end run on digits."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import reproduce  # noqa: E402
from conftest import build  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
  return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def _fake_run(out: Path, row: reproduce.Row, seed: int, mean_path: float | None,
              sampled: list[float], seconds: list[float], accs: list[float]) -> None:
  """A run directory holding only config.json, metrics.jsonl and (if mean_path) summary.json."""
  cfg = row.config(seed=seed, epochs=len(seconds))
  d = out / "runs" / reproduce.row_dirname(row.id) / f"seed{seed}"
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps(cfg.to_dict()))
  (d / "metrics.jsonl").write_text("".join(
      json.dumps({"epoch": e + 1, "step": 10 * (e + 1), "seconds": s, "train_loss": 1.0,
                  "test_accuracy": a}) + "\n"
      for e, (s, a) in enumerate(zip(seconds, accs))))
  if mean_path is not None:
    (d / "summary.json").write_text(json.dumps({
        "test_accuracy": mean_path, "test_accuracy_mean_path": mean_path,
        "test_accuracy_stochastic": float(np.mean(sampled)),
        "test_accuracy_stochastic_runs": sampled, "train_seconds": sum(seconds),
        "epochs": len(seconds), "n_train": 60000, "n_test": 10000, "config": cfg.to_dict()}))


def test_rows_cover_both_tables():
  assert len(reproduce.TABLE1) == 3 * (4 * 3 + 1) and len(reproduce.TABLE2) == 4 * 3
  ids = [r.id for r in reproduce.ROWS]
  assert len(set(ids)) == len(ids)
  assert {"mnist/dt/onehot", "cifar10/fm/dim20", "mnist/adjoint/onehot",
          "cifar100/ct/prototype", "tiny_imagenet/backprop/dim20"} <= set(ids)
  assert reproduce.PAPER["cifar100/fm/onehot"] == 6.38
  assert reproduce.PAPER["cifar10/dt/prototype"] == 80.54
  assert reproduce.PAPER["tiny_imagenet/dt/onehot"] is None
  cfg = reproduce.select_rows(["cifar10/fm/dim20"])[0].config(seed=2)
  assert (cfg.method, cfg.model["embedding"], cfg.model["embedding_dim"], cfg.train.seed,
          cfg.train.epochs) == ("fm", "learned", 20, 2, 500)
  cfg = reproduce.select_rows(["mnist/dt/prototype"])[0].config()
  model = build(cfg)[1]  # MNIST's shapes
  assert model.embedding == "prototype" and model.dim == 784 and cfg.train.epochs == 100
  cfg = reproduce.select_rows(["cifar100/adjoint/onehot"])[0].config(inference_steps=10)
  assert "embedding" not in cfg.model and cfg.model["inference_steps"] == 10  # one-hot, fixed


def test_select_rows_patterns_tables_and_errors():
  ids = lambda *p: [r.id for r in reproduce.select_rows(p)]
  assert ids("mnist/dt/onehot") == ["mnist/dt/onehot"]
  assert ids("mnist/*") == [r.id for r in reproduce.TABLE1[:13]]
  assert ids("*/adjoint/*") == ["mnist/adjoint/onehot", "cifar10/adjoint/onehot",
                                "cifar100/adjoint/onehot"]
  assert ids("table2") == [r.id for r in reproduce.TABLE2]
  assert ids("table1", "table2") == ids("all") == [r.id for r in reproduce.ROWS]
  assert ids("mnist/fm/onehot", "mnist/dt/onehot", "mnist/dt/*") == [  # table order, no repeats
      "mnist/dt/onehot", "mnist/dt/dim20", "mnist/dt/prototype", "mnist/fm/onehot"]
  with pytest.raises(ValueError, match=r"no row matches 'mnist/dt/one'.*mnist/dt/onehot"):
    reproduce.select_rows(["mnist/dt/one"])


def test_cli_unknown_row_is_a_clear_error(capsys, tmp_path):
  assert reproduce.main(["--rows", "svhn/dt/onehot", "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "no row matches 'svhn/dt/onehot'" in err and "cifar10/fm/dim20" in err
  assert reproduce.main(["--out", str(tmp_path)]) == 2
  assert "--list" in capsys.readouterr().err


def test_results_table_on_fake_runs(tmp_path):
  dt, fm = reproduce.select_rows(["mnist/dt/onehot"])[0], reproduce.select_rows(["tiny_imagenet/fm/dim20"])[0]
  _fake_run(tmp_path, dt, 0, 0.98, [0.97, 0.98], [20.0, 40.0], [0.95, 0.98])
  _fake_run(tmp_path, dt, 1, 0.99, [0.96, 0.97], [30.0, 50.0], [0.96, 0.99])
  _fake_run(tmp_path, fm, 0, 0.55, [0.5], [100.0], [0.55])
  _fake_run(tmp_path, fm, 1, None, [], [10.0], [0.3])  # unfinished: listed, not averaged
  (tmp_path / "commands.txt").write_text("python experiments/reproduce.py --rows mnist/dt/onehot\n")
  table = reproduce.results_table(tmp_path)
  lines = table.splitlines()
  dt_line = next(l for l in lines if l.startswith("| mnist/dt/onehot |"))
  # mean path: 98, 99 -> 98.50 +- std(ddof=1)/sqrt(2) = 0.50; sampled: 97, 98, 96, 97 ->
  # 97.00 +- sqrt(2/3)/2 = 0.41; 2 seeds, 2 epochs, mean of 60 s and 80 s.
  assert dt_line == "| mnist/dt/onehot | 99.47 | 98.50 ± 0.50 | 97.00 ± 0.41 | 2 | 2 | 60000 / 10000 | 70 s |"
  fm_line = next(l for l in lines if l.startswith("| tiny_imagenet/fm/dim20 |"))
  assert fm_line == "| tiny_imagenet/fm/dim20 | n/a | 55.00 | 50.00 | 1 | 1 | 60000 / 10000 | 100 s |"
  assert lines.index(dt_line) < lines.index(fm_line)
  assert "tiny_imagenet/fm/dim20 seed 1 (1/1 epochs)" in table
  assert "    python experiments/reproduce.py --rows mnist/dt/onehot" in lines

  curves = reproduce.accuracy_curves(reproduce.read_runs(tmp_path)["mnist/dt/onehot"])
  np.testing.assert_allclose(curves["epoch"], [1, 2])
  np.testing.assert_allclose(curves["seconds"], [25.0, 70.0])
  np.testing.assert_allclose(curves["accuracy"], [95.5, 98.5])
  reproduce.plot_accuracy({"mnist/dt/onehot": curves}, tmp_path / "accuracy.png")
  assert _is_png(tmp_path / "accuracy.png")


def test_cli_report_only_rebuilds_from_run_dirs(tmp_path, capsys):
  row = reproduce.select_rows(["mnist/fm/onehot"])[0]
  _fake_run(tmp_path, row, 0, 0.9, [0.8, 0.85], [5.0], [0.9])  # no checkpoint: no image plots
  assert reproduce.main(["--report-only", "--out", str(tmp_path)]) == 0
  table = (tmp_path / "results.md").read_text()
  assert "| mnist/fm/onehot | 99.21 | 90.00 | 82.50 ± 2.50 | 1 | 1 |" in table
  assert "    python experiments/reproduce.py --report-only --out " + str(tmp_path) in table
  assert _is_png(tmp_path / "plots" / "accuracy.png")
  assert "[mnist/fm/onehot] plots skipped" in capsys.readouterr().out


def test_a_row_whose_data_is_missing_fails_alone(tmp_path):
  rows = reproduce.select_rows(["mnist/dt/onehot", "mnist/fm/onehot"])
  log = []
  failed = reproduce.run_rows(rows, tmp_path / "out", reproduce.Datasets(str(tmp_path)),
                              seeds=2, print_fn=log.append)
  assert failed == ["mnist/dt/onehot", "mnist/fm/onehot"]
  assert len(log) == 2 and all("train-images-idx3-ubyte.gz" in l for l in log), log


def test_fmt_helpers():
  assert reproduce.fmt_pct([0.5]) == "50.00" and reproduce.fmt_pct([]) == "n/a"
  assert reproduce.fmt_pct([0.1, 0.1, 0.1]) == "10.00 ± 0.00"
  assert [reproduce.fmt_duration(s) for s in (59, 600, 36000)] == ["59 s", "10.0 min", "10.0 h"]


@pytest.mark.parametrize("shape", [(8, 8, 1), (6, 6, 3)])
def test_plots_on_random_arrays(tmp_path, shape):
  rng = np.random.default_rng(0)
  m = 12
  reproduce.plot_embeddings(rng.normal(size=(m, int(np.prod(shape)))), shape, tmp_path / "e.png", "emb")
  images = rng.integers(0, 256, size=(40, *shape), dtype=np.uint8)
  labels = rng.integers(0, m, size=40)
  preds = np.where(np.arange(40) % 3 == 0, (labels + 1) % m, labels)
  reproduce.plot_predictions(images, labels, preds, tmp_path / "p.png", "pred")
  reproduce.plot_predictions(images[:5].astype(np.float32) / 255, labels[:5], preds[:5],
                             tmp_path / "p5.png")
  for name in ("e.png", "p.png", "p5.png"):
    assert _is_png(tmp_path / name), name


def test_subset_and_dataset_dir(tmp_path, digits):
  small = reproduce.subset(digits, 100, 50)
  assert len(small.train.labels) == 100 and len(small.test.labels) == 50
  np.testing.assert_array_equal(small.train.images, digits.train.images[:100])
  assert "first 100 train" in small.source
  (tmp_path / "mnist").mkdir()
  assert reproduce.dataset_dir(str(tmp_path), "mnist") == str(tmp_path / "mnist")
  assert reproduce.dataset_dir(str(tmp_path), "cifar10") == str(tmp_path)
  assert reproduce.dataset_dir(None, "mnist") is None


def test_end_to_end_on_digits(tmp_path, digits):
  """One DT row on digits (T=2, one epoch, one seed: compiling costs ~40 s of CPU): the run,
  the skip of a finished run, results.md and the plots. The config is test_trainer's TINY
  at seed 0, so in a whole-suite run the persistent compilation cache serves both."""
  row = reproduce.Row("digits", "dt", "onehot", overrides=(("T", 2),))
  datasets = reproduce.Datasets(preloaded=[digits])
  log = []
  run = lambda: reproduce.run_rows([row], tmp_path, datasets, seeds=1, inference_runs=2,
                                   epochs=1, print_fn=log.append)
  assert run() == [], log
  s = json.loads((tmp_path / "runs" / "digits_dt_onehot" / "seed0" / "summary.json").read_text())
  assert s["config"]["model"]["T"] == 2 and s["epochs"] == 1 and len(s["test_accuracy_stochastic_runs"]) == 2
  log.clear()
  assert run() == [] and log == ["[digits/dt/onehot seed 0] done already"]
  table = reproduce.write_report(tmp_path, datasets, print_fn=log.append)
  assert (tmp_path / "results.md").read_text() == table
  line = next(l for l in table.splitlines() if l.startswith("| digits/dt/onehot |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  ds = datasets.get("digits")
  assert cells[1] == "n/a" and cells[2] == f"{100 * s['test_accuracy_mean_path']:.2f}", line
  assert cells[4:7] == ["1", "1", f"{len(ds.train.labels)} / {len(ds.test.labels)}"], line
  assert _is_png(tmp_path / "plots" / "accuracy.png")
  assert _is_png(tmp_path / "plots" / "predictions_digits_dt_onehot.png"), log
