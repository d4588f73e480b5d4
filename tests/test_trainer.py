"""The training loop: learning, exact resume, config guard, non-finite loss, CLI errors, and
the CLI on a user's own .npz arrays."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from noprop_jax import data, dt, host_memory
from noprop_jax.workdir import ConfigMismatchError
from noprop_jax.config import RunConfig
from noprop_jax.trainer import init_state, load_run, train

from conftest import Killed, assert_trees, build, killed_after, stepper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import train as train_cli  # noqa: E402

TINY = dict(dataset="digits", T=2, batch_size=128, inference_runs=2)  # 11 steps per epoch


def _cfg(**kw):
  kw = {**TINY, **kw}
  return RunConfig.create(kw.pop("method", "dt"), **kw)


def _run(workdir, dataset, **kw):
  return train(_cfg(**kw.pop("cfg", {})), workdir, dataset=dataset, progress=False,
               print_fn=lambda s: None, **kw)


def _state(workdir):
  """(state, step) of the run's latest checkpoint."""
  _, _, state, step = load_run(workdir)
  return state, step


def test_short_digits_run_learns_and_writes_metrics(tmp_path, digits):
  # The other tests' config (one compilation per worker), 33 steps: 0.90 on XLA:CPU.
  s = _run(tmp_path, digits, cfg=dict(epochs=3))
  assert s["test_accuracy"] >= 0.85, s  # chance is 0.10
  # The sampled runs' accuracies: two fractions of the test split, and their mean.
  runs, n_test = s["test_accuracy_stochastic_runs"], len(digits.test.labels)
  assert len(runs) == 2 and s["n_test"] == n_test
  assert all(abs(a * n_test - round(a * n_test)) < 1e-3 for a in runs), runs
  assert s["test_accuracy_stochastic"] == pytest.approx(np.mean(runs), rel=1e-6)
  assert s["params_per_block"] == 526_730 and s["config"]["model"]["T"] == 2
  assert s["input_shape"] == [8, 8, 1] and s["num_classes"] == 10 and s["steps"] == 33
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == list(range(1, 4))
  for key in ("train_loss", "train_accuracy", "test_accuracy", "seconds"):
    assert all(np.isfinite(l[key]) for l in lines)
  assert lines[-1]["train_loss"] < lines[0]["train_loss"]
  assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == s["test_accuracy"]


def test_resume_after_interruption_is_exact(tmp_path, digits):
  a, b = tmp_path / "a", tmp_path / "b"
  _run(a, digits, cfg=dict(epochs=2), checkpoint_every=4)
  with killed_after(14), pytest.raises(Killed):  # mid epoch 2
    _run(b, digits, cfg=dict(epochs=2), checkpoint_every=4)
  assert _state(b)[1] == 12  # last checkpoint before the "kill": step 12 of 22
  _run(b, digits, cfg=dict(epochs=2), checkpoint_every=4)
  (sa, _), (sb, step) = _state(a), _state(b)
  assert step == 22
  assert_trees(sb, sa)  # bit for bit
  la = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
  lb = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lb] == [1, 2]
  assert la[1]["train_loss"] == pytest.approx(lb[1]["train_loss"], rel=1e-6)
  assert la[1]["test_accuracy"] == lb[1]["test_accuracy"]


@pytest.mark.parametrize("method", ["diffusion_blocks", "local"])
def test_resume_is_exact_for_every_state_layout(method, tmp_path, digits):
  """Stacked blocks with shared parts (DiffusionBlocks) and a per-block optimizer over the
  whole parameter tree (local learning) checkpoint and resume bit for bit too."""
  cfg = dict(method=method, epochs=2, block="mlp", hidden=32)
  a, b = tmp_path / "a", tmp_path / "b"
  _run(a, digits, cfg=cfg, checkpoint_every=4)
  with killed_after(14), pytest.raises(Killed):
    _run(b, digits, cfg=cfg, checkpoint_every=4)
  assert _state(b)[1] == 12
  sb = _run(b, digits, cfg=cfg, checkpoint_every=4)
  (xa, _), (xb, step) = _state(a), _state(b)
  assert step == 22 and sb["config"]["method"] == method
  assert_trees(xb, xa)  # bit for bit


def test_same_seed_same_result_other_seed_differs(tmp_path, digits):
  s1 = _run(tmp_path / "1", digits, cfg=dict(epochs=1))
  s2 = _run(tmp_path / "2", digits, cfg=dict(epochs=1))
  _run(tmp_path / "3", digits, cfg=dict(epochs=1, seed=1))
  p1, p2, p3 = (_state(tmp_path / n)[0] for n in ("1", "2", "3"))
  assert_trees(p2, p1)  # bit for bit
  assert s1["test_accuracy_stochastic_runs"] == s2["test_accuracy_stochastic_runs"]
  assert not np.array_equal(p1["shared"]["head"]["kernel"], p3["shared"]["head"]["kernel"])


def test_different_config_on_same_workdir_is_refused(tmp_path, digits):
  _run(tmp_path, digits, cfg=dict(epochs=1))
  with pytest.raises(ConfigMismatchError, match=r"seed: saved 0, now 1"):
    _run(tmp_path, digits, cfg=dict(epochs=1, seed=1))
  with pytest.raises(ConfigMismatchError, match=r"T: saved 2, now 3"):
    _run(tmp_path, digits, cfg=dict(epochs=1, T=3))
  s = _run(tmp_path, digits, cfg=dict(epochs=2))  # more epochs: resumes and extends
  assert s["steps"] == 22


def test_wrong_image_shape_is_refused(tmp_path, digits):
  wrong = dataclasses.replace(digits, train=data.Split(np.zeros((20, 28, 28, 1), np.float32),
                                                       np.zeros(20, np.int32)))
  with pytest.raises(ValueError, match=r"train and test inputs differ in shape"):
    _run(tmp_path, wrong)
  cfg = _cfg()
  model = build(cfg)[1]
  with pytest.raises(ValueError, match=r"inputs must have shape \[batch, 8, 8, 1\]"):
    dt.predict(model, init_state(cfg, model, jax.random.key(0)), np.zeros((4, 28, 28, 1)))


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "svhn"], "unknown dataset 'svhn'"),
    (["--method", "adjoint", "--embedding", "learned"],
     "--embedding is a setting of dt, ct, fm, backprop, not of adjoint"),
    (["--method", "ct", "--classifier", "radial"], "--classifier is a setting of dt, not of ct"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--T", "0"], "need T >= 1"),
    (["--method", "fm", "--inference-steps", "0"], "need inference_steps >= 1"),
    (["--lr", "-0.1"], "learning rate must be > 0"),
    (["--block", "resnet"], "unknown block 'resnet'"),
    (["--method", "backprop", "--precision", "bfloat16"], "is not implemented by backprop"),
])
def test_cli_bad_arguments(argv, match, capsys, tmp_path):
  assert train_cli.main(argv + ["--workdir", str(tmp_path)]) == 2
  assert match in _one_error_line(capsys)
  assert not (tmp_path / "config.json").exists()  # refused before touching the workdir


def test_cli_missing_data_files(capsys, tmp_path):
  rc = train_cli.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--workdir",
                       str(tmp_path / "w")])
  assert rc == 1
  err = capsys.readouterr().err
  assert "train-images-idx3-ubyte.gz" in err and str(tmp_path) in err


def test_one_compilation_per_config_and_no_host_transfers_per_step(digits, counted_method):
  # NoProp-DT's record again, with a train_step that fails the test when traced twice
  # (chex.assert_max_traces): the trainer builds this copy an epoch step of its own.
  cfg = _cfg(method=counted_method("dt", "dt_one_compilation").name)
  compute, model = build(cfg)
  step = stepper(cfg, model, compute, len(digits.train.labels))
  x, y = jax.device_put(digits.train.images), jax.device_put(digits.train.labels)
  state = init_state(cfg, model, jax.random.key(0))
  state, _ = step(state, x, y)  # traced (and compiled) here
  with jax.transfer_guard("disallow"):  # data and state already on the device
    for _ in range(13):  # crosses an epoch boundary (11 steps per epoch); a retrace fails
      state, m = step(state, x, y)
  assert int(state["step"]) == 14 and np.isfinite(float(m["loss"]))


def test_sequential_training_is_algorithm_1(tmp_path, digits):
  s = _run(tmp_path, digits, cfg=dict(epochs=1, training="sequential"))
  assert s["steps"] == 22  # T passes of 11 steps, pass t updates block t
  state, _ = _state(tmp_path)
  counts = np.asarray(state["opt_blocks"][1][0].count)  # per-block AdamW step counts
  np.testing.assert_array_equal(counts, [11, 11])
  assert int(state["opt_shared"][1][0].count) == 22  # the head trains every step


def test_eval_every_skips_test_evaluation_but_not_the_last_epoch(tmp_path, digits):
  _run(tmp_path, digits, cfg=dict(epochs=3, eval_every=2))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2, 3]
  assert ["test_accuracy" in l for l in lines] == [False, True, True]
  assert all(np.isfinite(l["train_loss"]) for l in lines)


# ----------------------------------------------------------------------------- the user's .npz

def _digits_npz(digits, path: Path, kind: str) -> tuple[list[int], int]:
  """A small slice of digits saved as the user's arrays: 'vectors' (64 features, all 10
  classes) or 'images' (8x8x1, classes 0-4 only). Returns (input_shape, num_classes)."""
  split = lambda s, n: (s.images[:n], s.labels[:n])
  (xa, ya), (xb, yb) = split(digits.train, 320), split(digits.test, 100)
  if kind == "vectors":
    xa, xb = xa.reshape(len(xa), 64), xb.reshape(len(xb), 64)
  else:
    xa, ya, xb, yb = xa[ya < 5], ya[ya < 5], xb[yb < 5], yb[yb < 5]
  np.savez(path, x_train=xa, y_train=ya.astype(np.int64), x_test=xb, y_test=yb.astype(np.int64))
  return list(xa.shape[1:]), int(max(ya.max(), yb.max())) + 1


# Every method on vectors with the MLP block; images with the paper block once (its
# compilation is the suite's dearest, and the block is the same for every method).
@pytest.mark.parametrize("method, kind, block", [
    ("dt", "vectors", "mlp"), ("fm", "vectors", "mlp"), ("backprop", "vectors", "mlp"),
    ("dt", "images", "paper")])
def test_cli_trains_on_a_npz_file(method, kind, block, tmp_path, capsys, digits):
  path = tmp_path / f"my_{kind}.npz"
  input_shape, num_classes = _digits_npz(digits, path, kind)
  assert num_classes == (10 if kind == "vectors" else 5)
  w = tmp_path / "run"
  argv = ["--method", method, "--dataset", str(path), "--block", block, "--epochs", "1",
          "--batch-size", "64", "--inference-runs", "1", "--workdir", str(w), "--no-progress"]
  argv += {"dt": ["--T", "2"], "backprop": ["--T", "2"], "fm": ["--inference-steps", "2"]}[method]
  argv += ["--hidden", "32"] if block == "mlp" else []
  assert train_cli.main(argv) == 0, capsys.readouterr().err
  assert "test accuracy" in capsys.readouterr().out
  s = json.loads((w / "summary.json").read_text())
  assert s["input_shape"] == input_shape and s["num_classes"] == num_classes
  assert s["data_source"] == str(path) and s["config"]["method"] == method
  assert s["config"]["data"]["dataset"] == str(path)
  assert s["host_memory"] == host_memory.status  # recorded with the run's settings
  cfg, model, state, step = load_run(w)  # the checkpoint rebuilds the model for these shapes
  assert list(model.input_shape) == input_shape and model.num_classes == num_classes
  assert step == s["steps"] and cfg.block.block == block
  # The reported accuracy is the mean path's on the file's test split: the checkpoint's
  # predictions on those arrays get it again.
  test = np.load(path)
  logits = np.asarray(cfg.method_record.predict(model, state, test["x_test"]))
  correct = np.argmax(logits, -1) == test["y_test"]
  assert s["n_test"] == len(correct) and s["test_accuracy"] == s["test_accuracy_mean_path"]
  assert s["test_accuracy"] == pytest.approx(np.mean(correct), abs=1e-6)


def _good_arrays():
  rng = np.random.RandomState(0)
  return dict(x_train=rng.rand(40, 6).astype(np.float32), y_train=np.arange(40) % 3,
              x_test=rng.rand(12, 6).astype(np.float32), y_test=np.arange(12) % 3)


def _broken(name):
  a = _good_arrays()
  if name == "missing key":
    del a["y_test"]
  elif name == "length mismatch":
    a["y_train"] = a["y_train"][:-1]
  elif name == "negative label":
    a["y_train"] = a["y_train"] - 1
  elif name == "float labels":
    a["y_test"] = a["y_test"].astype(np.float32)
  elif name == "one-hot labels":
    a["y_train"] = np.eye(3, dtype=np.int64)[a["y_train"]]
  elif name == "object array":
    a["x_test"] = np.array([object()] * 12, dtype=object)
  elif name == "non-finite inputs":
    a["x_train"][3, 2] = np.nan
  elif name == "shape mismatch":
    a["x_test"] = a["x_test"][:, :5]
  elif name == "one class":
    a["y_train"], a["y_test"] = np.zeros(40, np.int64), np.zeros(12, np.int64)
  return a


@pytest.mark.parametrize("name, match", [
    ("missing key", "missing keys ['y_test']"),
    ("length mismatch", "x_train has 40 examples but y_train has 39 labels"),
    ("negative label", "y_train has 14 negative labels"),
    ("float labels", "y_test has dtype float32 (float labels are not accepted)"),
    ("one-hot labels", "looks one-hot"),
    ("object array", "x_test is an object array"),
    ("non-finite inputs", "x_train has 1 non-finite values"),
    ("shape mismatch", "both splits need the same shape"),
    ("one class", "at least 2 classes"),
    ("not a zip", "corrupt or not a .npz file"),
    ("no file", "no such file"),
])
def test_cli_refuses_a_broken_npz_file(name, match, tmp_path, capsys):
  path = tmp_path / "arrays.npz"
  if name == "not a zip":
    path.write_bytes(b"these are not the arrays you are looking for")
  elif name != "no file":
    np.savez(path, **_broken(name))
  rc = train_cli.main(["--dataset", str(path), "--block", "mlp", "--epochs", "1",
                       "--workdir", str(tmp_path / "w"), "--no-progress"])
  assert rc == 1
  err = _one_error_line(capsys)
  assert match in err and str(path) in err, err
  assert not (tmp_path / "w" / "checkpoints").exists()  # stopped before training


def test_the_good_arrays_are_accepted(tmp_path):
  np.savez(tmp_path / "arrays.npz", **_good_arrays())
  ds = data.load(str(tmp_path / "arrays.npz"))
  assert ds.num_classes == 3 and ds.train.images.shape == (40, 6)
