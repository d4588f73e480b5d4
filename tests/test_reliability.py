"""Nothing lost, whatever happens to a run: run files replaced whole, the workdir lock,
foreign workdirs, damaged checkpoints and metrics, honest non-finite stops and the
resume they advise, and one-line CLI errors."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees
from noprop_jax import data
from noprop_jax import method as methods
from noprop_jax import workdir as wd
from noprop_jax.config import RunConfig
from noprop_jax.trainer import NonFiniteLossError, load_run, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import train as train_cli  # noqa: E402

# A small MLP network (11 steps per epoch): each run here takes a second or two.
SMALL = dict(dataset="digits", T=2, batch_size=128, block="mlp", hidden=32, inference_runs=1)
CLI = ["--T", "2", "--block", "mlp", "--hidden", "32", "--inference-runs", "1", "--no-progress"]


def _run(workdir, dataset, log=None, **kw):
  run_kw = {k: kw.pop(k) for k in ("checkpoint_every",) if k in kw}
  cfg = RunConfig.create("dt", **{**SMALL, **kw})
  return train(cfg, workdir, dataset=dataset, progress=False,
               print_fn=(log.append if log is not None else lambda s: None), **run_kw)


def _records(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


# ----------------------------------------------------------------------------- run files

def test_a_kill_during_a_file_write_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  wd.write_json(path, {"a": 1})

  def killed(*args):
    raise KeyboardInterrupt  # the process dies between writing and renaming

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    wd.write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 1}


def test_run_files_are_written_once_the_run_starts_and_only_when_they_change(tmp_path, digits):
  with pytest.raises(ValueError, match="batch_size 5000 is larger than the training set"):
    _run(tmp_path, digits, epochs=1, batch_size=5000)
  assert not (tmp_path / "config.json").exists()  # a failed start leaves nothing to refuse
  _run(tmp_path, digits, epochs=1)  # so the corrected command runs
  config = tmp_path / "config.json"
  saved = json.loads(config.read_text())
  assert saved["format"] == wd.FORMAT and saved["history"] == []
  assert saved["config"]["train"]["epochs"] == 1
  before = config.stat()
  (tmp_path / ".metrics.jsonl.12345.tmp").write_text('{"epoch": 1')  # a kill mid-write left it
  _run(tmp_path, digits, epochs=1)  # the same command again: config.json and metrics untouched
  assert (config.stat().st_ino, config.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  assert [r["epoch"] for r in _records(tmp_path)] == [1]
  assert not list(tmp_path.glob(".*.tmp"))


def test_kill_9_mid_run_then_the_same_command_resumes(tmp_path):
  w = tmp_path / "run"
  argv = [sys.executable, str(Path(train_cli.__file__)), *CLI, "--epochs", "30",
          "--checkpoint-every", "3", "--workdir", str(w)]
  # The child processes share this session's compilation cache: the rerun compiles nothing.
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not ((w / "metrics.jsonl").exists()
                                          and len(_records(w)) >= 1):
      time.sleep(0.05)
    assert len(_records(w)) >= 1, "the run did not start"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert json.loads((w / "config.json").read_text())["format"] == wd.FORMAT
  done = len(_records(w))
  out = subprocess.run(argv[:argv.index("--epochs") + 1] + [str(done + 2)] + argv[argv.index("--epochs") + 2:],
                       capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr
  assert "taking over" in out.stdout  # the killed run's lock file, without its lock
  assert [r["epoch"] for r in _records(w)] == list(range(1, done + 3))
  assert json.loads((w / "summary.json").read_text())["epochs"] == done + 2


# ----------------------------------------------------------------------------- the lock

def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(tmp_path, capsys, digits):
  with wd.lock(tmp_path):  # another run holds it
    rc = train_cli.main([*CLI, "--epochs", "1", "--workdir", str(tmp_path)])
    assert rc == 1
    err = _one_error_line(capsys)
    assert f"pid {os.getpid()}" in err and "in use by another run" in err, err
    assert not (tmp_path / "config.json").exists()
  log = []
  _run(tmp_path, digits, epochs=1, log=log)  # released: the next run goes ahead
  assert not any("taking over" in l for l in log)  # a clean end leaves no holder behind


def test_a_stale_lock_from_a_killed_run_is_taken_over(tmp_path, digits):
  (tmp_path / "run.lock").write_text(json.dumps(
      {"pid": 999999, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}))
  log = []
  _run(tmp_path, digits, epochs=1, log=log)
  assert any("taking over" in l and "pid 999999" in l for l in log), log
  assert (tmp_path / "run.lock").read_text() == ""


# ----------------------------------------------------------------------------- foreign workdirs

@pytest.mark.parametrize("files", [
    {"notes.txt": "my notes"},
    {"metrics.jsonl": '{"epoch": 1, "step": 5, "loss": 0.1}\n'},  # someone else's metrics
    {"config.json": '{"lr": 0.1}'},
    {"config.json": "not json at all"},
])
def test_a_workdir_this_tool_did_not_write_is_refused_and_left_alone(files, tmp_path, digits):
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  with pytest.raises(wd.WorkdirError, match="another --workdir|empty or new directory"):
    _run(tmp_path, digits, epochs=1)
  for name, text in files.items():
    assert (tmp_path / name).read_text() == text
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("lines, match", [
    ('{"step": 11}\n', r"line 1: expected the record of epoch 1"),
    ('{"epoch": 1, "step": 11}\n{"epoch": 1, "step": 11}\n', r"line 2: expected the record of epoch 2"),
    ('{"epoch": 1, "step": 11}\n{"epoch": 2, "st', r"line 2: not JSON"),
    ('{"epoch": 1, "step": 7}\n', r"epoch 1 ends at step 7, but this run's epochs are 11 steps"),
])
def test_damaged_or_foreign_metrics_are_refused_naming_the_file(lines, match, tmp_path, digits):
  _run(tmp_path, digits, epochs=1)
  (tmp_path / "metrics.jsonl").write_text(lines)
  with pytest.raises(wd.WorkdirError, match=match) as e:
    _run(tmp_path, digits, epochs=2)
  assert str(tmp_path / "metrics.jsonl") in str(e.value)
  assert (tmp_path / "metrics.jsonl").read_text() == lines


# ----------------------------------------------------------------------------- damaged checkpoints

def _damage(step_dir: Path) -> None:
  """Truncate the checkpoint's largest file (its array data) to half."""
  biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, digits):
  a, b = tmp_path / "a", tmp_path / "b"
  _run(a, digits, epochs=3)
  _run(b, digits, epochs=2)  # checkpoints at steps 11 and 22
  _damage(b / "checkpoints" / "22")
  log = []
  _run(b, digits, epochs=3, log=log)
  assert any("checkpoint at step 22" in l and "cannot be restored" in l for l in log), log
  assert any("resuming from checkpoint at step 11" in l for l in log), log
  assert len(list((b / "damaged-checkpoints").iterdir())) == 1  # kept, not deleted
  assert [r["epoch"] for r in _records(b)] == [1, 2, 3]
  (_, _, sa, step_a), (_, _, sb, step_b) = load_run(a), load_run(b)
  assert step_a == step_b == 33
  assert_trees(sb, sa)  # epoch 2 again, exactly


def test_no_intact_checkpoint_is_a_one_line_error(tmp_path, capsys):
  argv = [*CLI, "--epochs", "1", "--workdir", str(tmp_path)]
  assert train_cli.main(argv) == 0
  _damage(tmp_path / "checkpoints" / "11")
  assert train_cli.main(argv) == 1
  err = _one_error_line(capsys)
  assert "no checkpoint" in err and "can be restored" in err, err


# ----------------------------------------------------------------------------- non-finite stops

@contextlib.contextmanager
def _exploding_after(step: int):
  """Inside, NoProp-DT's step (its record's, which the trainer runs) returns non-finite
  parameters (with a finite loss, no refused update) from `step` on: an update that
  overflowed. The run keeps its method ('dt'), so the same workdir resumes after."""
  real = methods.get("dt")

  def step_fn(*args):
    state, m = real.train_step(*args)
    boom = jnp.where(state["step"] >= step, jnp.inf, 1.0)
    params = jax.tree.map(lambda p: p * boom, state["blocks"]["params"])
    return {**state, "blocks": {**state["blocks"], "params": params}}, m

  methods.register(dataclasses.replace(real, train_step=step_fn), replace=True)
  try:
    yield
  finally:
    methods.register(real, replace=True)


def test_non_finite_state_is_never_saved_and_the_advised_resume_works(tmp_path, digits):
  with _exploding_after(4), pytest.raises(NonFiniteLossError) as e:
    _run(tmp_path, digits, epochs=1, checkpoint_every=1)
  msg = str(e.value)
  assert "last good checkpoint is step 3" in msg and "--lr 0.0001" in msg, msg
  _, _, state, step = load_run(tmp_path)
  assert step == 3 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  s = _run(tmp_path, digits, epochs=1, lr=1e-4)  # the advice, followed
  assert s["steps"] == 11 and s["config"]["train"]["lr"] == 1e-4
  history = json.loads((tmp_path / "config.json").read_text())["history"]
  assert history == [{"step": 3, "time": history[0]["time"], "changed": {"lr": [1e-3, 1e-4]}}]


def test_a_finite_state_that_diverges_at_once_is_not_a_good_checkpoint(tmp_path, digits):
  # lr 1e30: the first update leaves finite parameters of ~1e30, the next loss is NaN.
  with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet") as e:
    _run(tmp_path, digits, epochs=1, checkpoint_every=1, lr=1e30)
  assert "by step 2" in str(e.value)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  s = _run(tmp_path, digits, epochs=1, lr=1e-3)  # the advice: start again with a lower lr
  assert s["steps"] == 11 and np.isfinite(_records(tmp_path)[0]["train_loss"])
  _, _, state, step = load_run(tmp_path)
  assert step == 11 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  history = json.loads((tmp_path / "config.json").read_text())["history"]
  assert [(h["step"], h["changed"]) for h in history] == [(0, {"lr": [1e30, 1e-3]})]


def test_a_nan_batch_is_refused_and_stops_training_with_the_last_good_checkpoint(tmp_path, digits):
  _run(tmp_path, digits, epochs=1)
  bad = np.array(digits.train.images, np.float32)
  bad[:] = np.nan
  poisoned = data.Dataset("digits", data.Split(bad, digits.train.labels), digits.test, 10, "test")
  with pytest.raises(NonFiniteLossError, match=r"last good checkpoint is step 11"):
    _run(tmp_path, poisoned, epochs=2)
  _, _, state, step = load_run(tmp_path)
  assert step == 11 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


# ----------------------------------------------------------------------------- CLI errors

def test_rerun_with_fewer_epochs_reports_what_the_state_has(tmp_path, digits):
  _run(tmp_path, digits, epochs=2)
  log = []
  s = _run(tmp_path, digits, epochs=1, log=log)
  assert s["epochs"] == 2 and s["steps"] == 22
  assert any("past --epochs 1" in l for l in log), log


@pytest.mark.parametrize("case, match, rc", [
    ("workdir is a file", "is a file, not a directory", 1),
    ("workdir inside a file", "is a file, not a directory", 1),
    ("workdir not writable", "is not writable", 1),
    ("checkpoint-every 0", "--checkpoint-every: must be >= 1, got 0", 2),
    ("checkpoint-every -5", "--checkpoint-every: must be >= 1, got -5", 2),
    ("lr inf", "must be > 0 and finite, got lr=inf", 2),
    ("seed -1", "seed must be >= 0, got -1", 2),
])
def test_cli_one_line_errors(case, match, rc, tmp_path, capsys, monkeypatch):
  w = tmp_path / "w"
  extra = []
  if case == "workdir is a file":
    w.write_text("x")
  elif case == "workdir inside a file":
    (tmp_path / "f").write_text("x")
    w = tmp_path / "f" / "w"
  elif case == "workdir not writable":
    w.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == w else real(p, mode))
  else:
    flag, value = case.split(" ")
    extra = [f"--{flag}", value]
  assert train_cli.main([*CLI, "--epochs", "1", "--workdir", str(w), *extra]) == rc
  assert match in _one_error_line(capsys)
