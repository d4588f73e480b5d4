"""NoProp-CT and -FM through the training loop and the CLI: learning, logged schedule,
exact resume, one compilation, bad input."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from noprop_jax import ct, data
from noprop_jax.config import RunConfig
from noprop_jax.trainer import init_state, load_run, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import train as train_cli  # noqa: E402
from conftest import Killed, assert_trees, build, killed_after, stepper

TINY = dict(dataset="digits", batch_size=128, inference_steps=20, inference_runs=1)


def _cfg(method, **kw):
  return RunConfig.create(method, **{**TINY, **kw})


def _run(workdir, method, dataset, **kw):
  cfg = _cfg(method, **kw.pop("cfg", {}))
  return train(cfg, workdir, dataset=dataset, progress=False, print_fn=lambda s: None, **kw)


# The other tests' config (batch 128, one compilation per worker): on XLA:CPU CT reaches
# 0.74 in 6 epochs, FM 0.87 in 8.
@pytest.mark.parametrize("method, epochs, floor", [("ct", 6, 0.6), ("fm", 8, 0.8)])
def test_short_digits_run_learns_and_logs(tmp_path, method, epochs, floor, digits):
  s = _run(tmp_path, method, digits, cfg=dict(epochs=epochs))
  assert s["test_accuracy"] >= floor, s  # chance is 0.10
  assert s["params_per_block"] == 474_506 and s["config"]["model"]["inference_steps"] == 20
  assert s["input_shape"] == [8, 8, 1] and s["num_classes"] == 10
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == list(range(1, epochs + 1))
  assert ["test_accuracy" in l for l in lines] == [False] * (epochs - 1) + [True]  # every 10, and the last
  assert lines[-1]["train_loss"] < lines[0]["train_loss"]
  cfg, model, state, step = load_run(tmp_path)
  assert step == epochs * 11 and cfg.method == method and model.input_shape == (8, 8, 1)
  if method == "ct":  # the learned schedule's endpoints, logged per epoch, move with training
    g0 = [l["gamma_0"] for l in lines]
    assert all(np.isfinite(g0)) and g0[-1] != ct.Model.gamma_0_init
    assert float(state["params"]["schedule"]["gamma_0"]) == pytest.approx(g0[-1])


def test_ct_resume_after_interruption_is_exact(tmp_path, digits):
  a, b = tmp_path / "a", tmp_path / "b"
  _run(a, "ct", digits, cfg=dict(epochs=2), checkpoint_every=4)
  with killed_after(14), pytest.raises(Killed):
    _run(b, "ct", digits, cfg=dict(epochs=2), checkpoint_every=4)
  assert load_run(b)[3] == 12
  _run(b, "ct", digits, cfg=dict(epochs=2), checkpoint_every=4)
  (_, _, sa, _), (_, _, sb, step) = load_run(a), load_run(b)
  assert step == 22
  assert_trees(sb, sa)  # bit for bit


@pytest.mark.parametrize("method", ["ct", "fm"])
def test_one_compilation_and_no_host_transfers_per_step(method, digits, counted_method):
  # A copy of the method whose train_step fails if traced twice: its own epoch step.
  cfg = _cfg(counted_method(method, f"{method}_one_compilation").name)
  compute, model = build(cfg)
  step = stepper(cfg, model, compute, len(digits.train.labels))
  x, y = jax.device_put(digits.train.images), jax.device_put(digits.train.labels)
  state, _ = step(init_state(cfg, model, jax.random.key(0)), x, y)  # traced (and compiled) here
  with jax.transfer_guard("disallow"):
    for _ in range(12):  # crosses an epoch boundary (11 steps per epoch); a retrace fails
      state, m = step(state, x, y)
  assert int(state["step"]) == 13 and np.isfinite(float(m["loss"]))


def test_wrong_image_shape_is_refused(tmp_path, digits):
  wrong = dataclasses.replace(digits, test=data.Split(np.zeros((20, 28, 28, 1), np.float32),
                                                      np.zeros(20, np.int32)))
  with pytest.raises(ValueError, match=r"train and test inputs differ in shape"):
    _run(tmp_path, "fm", wrong)


def test_load_run_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a training run"):
    load_run(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(RunConfig.create("fm").to_dict()))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    load_run(tmp_path)


def test_cli_trains_fm_and_refuses_dt_only_flags(tmp_path, capsys):
  w = tmp_path / "fm"
  assert train_cli.main(["--method", "fm", "--epochs", "1", "--inference-steps", "5",
                         "--inference-runs", "1", "--workdir", str(w), "--no-progress"]) == 0
  assert "test accuracy" in capsys.readouterr().out
  summary = json.loads((w / "summary.json").read_text())
  assert summary["config"]["method"] == "fm" and summary["config"]["model"]["inference_steps"] == 5
  # A resumable change (inference steps) is accepted; a changed method is refused.
  assert train_cli.main(["--method", "fm", "--epochs", "1", "--inference-steps", "7",
                         "--inference-runs", "1", "--workdir", str(w), "--no-progress"]) == 0
  capsys.readouterr()
  assert train_cli.main(["--method", "ct", "--epochs", "1", "--workdir", str(w)]) == 1
  assert "different config" in capsys.readouterr().err
  assert train_cli.main(["--method", "ct", "--training", "sequential", "--workdir",
                         str(tmp_path / "x")]) == 2
  assert "not implemented by ct; methods that have it: ['dt'" in capsys.readouterr().err
