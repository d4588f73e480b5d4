"""NoProp-CT and -FM through the training loop and the CLI: learning, logged schedule,
exact resume, one compilation, bad input."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from noprop_jax import continuous, data
from noprop_jax.checkpoint import Checkpointer
from noprop_jax.config import Config
from noprop_jax.trainer import load_run, make_epoch_step, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import inference_benchmark  # noqa: E402
import train as train_cli  # noqa: E402

DIGITS = data.load("digits")
TINY = dict(dataset="digits", batch_size=128, inference_steps=20, inference_runs=1)


def _run(workdir, method, **kw):
  cfg = Config.create(method=method, **{**TINY, **kw.pop("cfg", {})})
  return train(cfg, workdir, dataset=kw.pop("dataset", DIGITS), progress=False,
               print_fn=lambda s: None, **kw)


@pytest.mark.parametrize("method, floor", [("ct", 0.6), ("fm", 0.8)])
def test_short_digits_run_learns_and_logs(tmp_path, method, floor):
  s = _run(tmp_path, method, cfg=dict(epochs=4, batch_size=32))
  assert s["test_accuracy"] >= floor, s  # chance is 0.10
  assert s["params_per_block"] == 474_506 and s["inference_steps"] == 20
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
  assert lines[-1]["train_loss"] < lines[0]["train_loss"]
  if method == "ct":  # the learned schedule's endpoints, logged per epoch, move with training
    g0 = [l["gamma_0"] for l in lines]
    assert all(np.isfinite(g0)) and g0[-1] != Config.gamma_0_init
    cfg, state, step = load_run(tmp_path)
    assert step == 4 * 44 and cfg.method == "ct"
    assert float(state["params"]["schedule"]["gamma_0"]) == pytest.approx(g0[-1])


def test_ct_resume_after_interruption_is_exact(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _run(a, "ct", cfg=dict(epochs=2), checkpoint_every=4)
  assert _run(b, "ct", cfg=dict(epochs=2), checkpoint_every=4, stop_at_step=14) is None
  _, _, step = load_run(b)
  assert step == 12
  _run(b, "ct", cfg=dict(epochs=2), checkpoint_every=4)
  (_, sa, _), (_, sb, step) = load_run(a), load_run(b)
  assert step == 22
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("method", ["ct", "fm"])
def test_one_compilation_and_no_host_transfers_per_step(method, traces):
  cfg = Config.create(method=method, **TINY)
  step = make_epoch_step(cfg, len(DIGITS.train.labels))
  x, y = jax.device_put(DIGITS.train.images), jax.device_put(DIGITS.train.labels)
  state, _ = step(continuous.init(cfg, jax.random.key(0)), x, y)
  traces.clear()
  with jax.transfer_guard("disallow"):
    for _ in range(12):  # crosses an epoch boundary (11 steps per epoch)
      state, m = step(state, x, y)
  assert traces == [], f"retraced {len(traces)} times after the first step"
  assert int(state["step"]) == 13 and np.isfinite(float(m["loss"]))


def test_wrong_image_shape_is_refused(tmp_path):
  wrong = dataclasses.replace(DIGITS, test=data.Split(np.zeros((20, 28, 28, 1), np.float32),
                                                      np.zeros(20, np.int32)))
  with pytest.raises(ValueError, match=r"shape \[batch, 8, 8, 1\]"):
    _run(tmp_path, "fm", dataset=wrong)


def test_load_run_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a training run"):
    load_run(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(Config.create(method="fm").to_dict()))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    load_run(tmp_path)


def test_cli_trains_fm_and_refuses_dt_only_flags(tmp_path, capsys):
  w = tmp_path / "fm"
  assert train_cli.main(["--method", "fm", "--epochs", "1", "--inference-steps", "5",
                         "--inference-runs", "1", "--workdir", str(w), "--no-progress"]) == 0
  assert "test accuracy" in capsys.readouterr().out
  assert json.loads((w / "summary.json").read_text())["config"]["method"] == "fm"
  # The inference benchmark reads the run back and times the three implementations.
  assert inference_benchmark.main(["--workdir", str(w), "--steps", "3", "--time-images", "16",
                                   "--json"]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert row["steps"] == 3 and row["same_predictions"] == 1.0
  assert 0 <= row["test_accuracy"] <= 1 and row["hoisted_ms_per_image"] > 0
  # A resumable change (inference steps) is accepted; a changed method is refused.
  assert train_cli.main(["--method", "fm", "--epochs", "1", "--inference-steps", "7",
                         "--inference-runs", "1", "--workdir", str(w), "--no-progress"]) == 0
  assert train_cli.main(["--method", "ct", "--epochs", "1", "--workdir", str(w)]) == 1
  assert "different config" in capsys.readouterr().err
  assert train_cli.main(["--method", "ct", "--training", "sequential", "--workdir",
                         str(tmp_path / "x")]) == 2
  assert "NoProp-DT's" in capsys.readouterr().err
