"""The training loop: learning, exact resume, config guard, non-finite loss, CLI errors."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from noprop_jax import data
from noprop_jax.checkpoint import Checkpointer, ConfigMismatchError
from noprop_jax.config import Config
from noprop_jax.trainer import NonFiniteLossError, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import train as train_cli  # noqa: E402

DIGITS = data.load("digits")
TINY = dict(dataset="digits", T=2, batch_size=128, inference_runs=2)  # 11 steps per epoch


def _run(workdir, **kw):
  cfg = Config.create(**{**TINY, **kw.pop("cfg", {})})
  return train(cfg, workdir, dataset=kw.pop("dataset", DIGITS), progress=False,
               print_fn=lambda s: None, **kw)


def _params(workdir, cfg_kw):
  from noprop_jax import dt
  cfg = Config.create(**{**TINY, **cfg_kw})
  ckpt = Checkpointer(Path(workdir))
  state, meta = ckpt.restore(ckpt.latest_step(), dt.init(cfg, jax.random.key(0)))
  ckpt.close()
  return state, meta


def test_short_digits_run_learns_and_writes_metrics(tmp_path):
  s = _run(tmp_path, cfg=dict(T=3, epochs=6, batch_size=32))
  assert s["test_accuracy"] >= 0.85, s  # chance is 0.10
  assert 0 <= s["test_accuracy_stochastic"] <= 1 and len(s["test_accuracy_stochastic_runs"]) == 2
  assert s["params_per_block"] == 526_730 and s["config"]["T"] == 3
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == list(range(1, 7))
  for key in ("train_loss", "train_accuracy", "test_accuracy", "seconds"):
    assert all(np.isfinite(l[key]) for l in lines)
  assert lines[-1]["train_loss"] < lines[0]["train_loss"]
  assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == s["test_accuracy"]


def test_resume_after_interruption_is_exact(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  _run(a, cfg=dict(epochs=2), checkpoint_every=4)
  assert _run(b, cfg=dict(epochs=2), checkpoint_every=4, stop_at_step=14) is None  # mid epoch 2
  _, meta = _params(b, dict(epochs=2))
  assert meta["step"] == 12  # last checkpoint before the "kill": step 12 of 22
  _run(b, cfg=dict(epochs=2), checkpoint_every=4)
  sa, _ = _params(a, dict(epochs=2))
  sb, meta = _params(b, dict(epochs=2))
  assert meta["step"] == 22
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)
  la = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
  lb = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lb] == [1, 2]
  assert la[1]["train_loss"] == pytest.approx(lb[1]["train_loss"], rel=1e-6)
  assert la[1]["test_accuracy"] == lb[1]["test_accuracy"]


def test_same_seed_same_result_other_seed_differs(tmp_path):
  s1 = _run(tmp_path / "1", cfg=dict(epochs=1))
  s2 = _run(tmp_path / "2", cfg=dict(epochs=1))
  s3 = _run(tmp_path / "3", cfg=dict(epochs=1, seed=1))
  p1, p2, p3 = (_params(tmp_path / n, dict(epochs=1, seed=s))[0] for n, s in (("1", 0), ("2", 0), ("3", 1)))
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(x, y)
  assert s1["test_accuracy_stochastic_runs"] == s2["test_accuracy_stochastic_runs"]
  assert not np.array_equal(p1["shared"]["head"]["kernel"], p3["shared"]["head"]["kernel"])


def test_different_config_on_same_workdir_is_refused(tmp_path):
  _run(tmp_path, cfg=dict(epochs=1))
  with pytest.raises(ConfigMismatchError, match=r"lr: saved 0.001, now 0.01"):
    _run(tmp_path, cfg=dict(epochs=1, lr=1e-2))
  s = _run(tmp_path, cfg=dict(epochs=2))  # more epochs: resumes and extends
  assert s["steps"] == 22


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
  _run(tmp_path, cfg=dict(epochs=1))
  bad = np.array(DIGITS.train.images)
  bad[:] = np.nan
  poisoned = dataclasses.replace(DIGITS, train=data.Split(bad, DIGITS.train.labels))
  with pytest.raises(NonFiniteLossError, match=r"last good checkpoint \(step 11\)"):
    _run(tmp_path, cfg=dict(epochs=2), dataset=poisoned)
  state, meta = _params(tmp_path, dict(epochs=2))
  assert meta["step"] == 11
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_wrong_image_shape_is_refused(tmp_path):
  wrong = dataclasses.replace(DIGITS, train=data.Split(np.zeros((20, 28, 28, 1), np.float32),
                                                       np.zeros(20, np.int32)))
  with pytest.raises(ValueError, match=r"shape \[batch, 8, 8, 1\]"):
    _run(tmp_path, dataset=wrong)


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "svhn"], "unknown dataset 'svhn'"),
    (["--method", "adjoint", "--embedding", "learned"], "fixed one-hot embedding"),
    (["--method", "magic"], "unknown method"),
    (["--T", "0"], "T must be >= 1"),
    (["--lr", "-0.1"], "learning rate must be > 0"),
])
def test_cli_bad_arguments(argv, match, capsys, tmp_path):
  assert train_cli.main(argv + ["--workdir", str(tmp_path)]) == 2
  assert match in capsys.readouterr().err


def test_cli_missing_data_files(capsys, tmp_path):
  rc = train_cli.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--workdir",
                       str(tmp_path / "w")])
  assert rc == 1
  err = capsys.readouterr().err
  assert "train-images-idx3-ubyte.gz" in err and str(tmp_path) in err


def test_one_compilation_per_config_and_no_host_transfers_per_step(traces):
  from noprop_jax import dt
  from noprop_jax.trainer import make_epoch_step

  cfg = Config.create(**TINY)
  step = make_epoch_step(cfg, len(DIGITS.train.labels))
  x, y = jax.device_put(DIGITS.train.images), jax.device_put(DIGITS.train.labels)
  state = dt.init(cfg, jax.random.key(0))
  state, _ = step(state, x, y)
  assert traces, "the listener must see the first trace"
  traces.clear()
  with jax.transfer_guard("disallow"):  # data and state already on the device
    for _ in range(13):  # crosses an epoch boundary (11 steps per epoch)
      state, m = step(state, x, y)
  assert traces == [], f"retraced {len(traces)} times after the first step"
  assert int(state["step"]) == 14 and np.isfinite(float(m["loss"]))


def test_sequential_training_is_algorithm_1(tmp_path):
  s = _run(tmp_path, cfg=dict(epochs=1, training="sequential"))
  assert s["steps"] == 22  # T passes of 11 steps, pass t updates block t
  state, _ = _params(tmp_path, dict(epochs=1, training="sequential"))
  counts = np.asarray(state["opt_blocks"][1][0].count)  # per-block AdamW step counts
  np.testing.assert_array_equal(counts, [11, 11])
  assert int(state["opt_shared"][1][0].count) == 22  # the head trains every step


def test_eval_every_skips_test_evaluation_but_not_the_last_epoch(tmp_path):
  _run(tmp_path, cfg=dict(epochs=3, eval_every=2))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2, 3]
  assert ["test_accuracy" in l for l in lines] == [False, True, True]
  assert all(np.isfinite(l["train_loss"]) for l in lines)
