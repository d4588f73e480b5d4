"""Preemption: SIGTERM or SIGINT stops a run cleanly at a step (checkpointed, verified,
recorded, lock released), a second signal stops it at once, and the resumed run ends
exactly where an uninterrupted one does.

The signals are real (`os.kill` of this process), sent from inside the run at chosen
moments: mid-epoch, during an evaluation, while a checkpoint is being written, while
the step compiles, and during the stop's own checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import assert_trees
from noprop_jax import checkpoint, stopping, trainer
from noprop_jax import workdir as wd
from noprop_jax.config import RunConfig

# 11 steps per epoch; a checkpoint every 4 steps, so the stops fall between scheduled ones.
SMALL = dict(dataset="digits", T=2, batch_size=128, block="mlp", hidden=32, inference_runs=1,
             epochs=3)
CLI = ["--T", "2", "--batch-size", "128", "--block", "mlp", "--hidden", "32",
       "--inference-runs", "1", "--epochs", "3", "--checkpoint-every", "4", "--no-progress"]
PER_EPOCH = 11
TIMING = ("seconds", "eval_seconds")


def _train(workdir, digits, log=None):
  return trainer.train(RunConfig.create("dt", **SMALL), workdir, dataset=digits,
                       checkpoint_every=4, progress=False,
                       print_fn=log.append if log is not None else lambda s: None)


def _records(workdir):
  return [{k: v for k, v in json.loads(l).items() if k not in TIMING}
          for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
  """An uninterrupted run: its metrics records, final state and summary."""
  w = tmp_path_factory.mktemp("uninterrupted")
  summary = _train(w, digits)
  return _records(w), trainer.load_run(w)[2], summary


def _kill(sig=signal.SIGTERM):
  """Send `sig` to this process, as a scheduler would; only while train() handles it
  (the default action would end the test run)."""
  assert signal.getsignal(sig) is stopping._handler, "train() does not handle the signal"
  os.kill(os.getpid(), sig)


def _patch_setup(monkeypatch, wrap):
  """Every `trainer.setup` from now on hands its Run to `wrap` before training."""
  real = trainer.setup

  def setup(*a, **kw):
    run, state = real(*a, **kw)
    wrap(run)
    return run, state

  monkeypatch.setattr(trainer, "setup", setup)


def _at_step(n, action):
  def wrap(run):
    step_fn, done = run.step_fn, [run.start]

    def step(*a):
      out = step_fn(*a)
      done[0] += 1
      if done[0] == n:
        action()
      return out

    run.step_fn = step
  return wrap


def _in_evaluation(epoch):
  def wrap(run):
    evaluate, calls = run.eval_test, [0]

    def ev(*a):
      calls[0] += 1
      if calls[0] == epoch:
        _kill()
      return evaluate(*a)

    run.eval_test = ev
  return wrap


def _during_checkpoint_write(step):
  """SIGTERM right after the scheduled checkpoint of `step` has started writing."""
  def wrap(run):
    save = run.ckpt.save

    def saving(s, *a, **kw):
      save(s, *a, **kw)
      if s == step:
        _kill()

    run.ckpt.save = saving
  return wrap


def _while_compiling(monkeypatch):
  real = trainer.fit_blocks_per_step

  def fit(*a, **kw):
    _kill()  # handled once the step is compiled: the first step then runs, and stops
    return real(*a, **kw)

  monkeypatch.setattr(trainer, "fit_blocks_per_step", fit)


def _from_a_thread():
  t = threading.Thread(target=stopping.request, args=("asked from a notebook",))
  t.start()
  t.join()


# (where, how to stop there, the step it stops at, why)
CASES = {
    "mid-epoch": (lambda mp: _patch_setup(mp, _at_step(16, _kill)), 16, "SIGTERM"),
    "sigint": (lambda mp: _patch_setup(mp, _at_step(6, lambda: _kill(signal.SIGINT))), 6, "SIGINT"),
    "during evaluation": (lambda mp: _patch_setup(mp, _in_evaluation(1)), PER_EPOCH, "SIGTERM"),
    "during a checkpoint write": (lambda mp: _patch_setup(mp, _during_checkpoint_write(12)), 13,
                                  "SIGTERM"),
    "while compiling": (_while_compiling, 1, "SIGTERM"),
    "request from a thread": (lambda mp: _patch_setup(mp, _at_step(19, _from_a_thread)), 19,
                              "asked from a notebook"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_stop_checkpoints_its_step_and_the_rerun_ends_as_if_uninterrupted(
    case, tmp_path, digits, monkeypatch, reference):
  arrange, step, why = CASES[case]
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with monkeypatch.context() as mp:
    arrange(mp)
    with pytest.raises(stopping.Stopped) as e:
      _train(tmp_path, digits)
  assert (e.value.step, e.value.reason) == (step, why)
  assert f"stopped at step {step} " in str(e.value) and "run the same command again" in str(e.value)
  # Nothing of the signal handling outlives the run.
  assert {s: signal.getsignal(s) for s in handlers} == handlers and stopping.requested() is None

  # What a stopped run leaves: its step's checkpoint (restorable), metrics.jsonl up to
  # the last finished epoch then where it stopped, and a released lock.
  assert trainer.load_run(tmp_path)[3] == step
  records = _records(tmp_path)
  assert records[-1] == {"stopped": why, "step": step, "epochs": step / PER_EPOCH,
                         "time": records[-1]["time"]}
  assert records[:-1] == reference[0][:step // PER_EPOCH]
  assert wd.read_stop(tmp_path / "metrics.jsonl")["step"] == step
  assert (tmp_path / "run.lock").read_text() == ""

  # The rerun resumes from that step and ends exactly as the uninterrupted run.
  log = []
  summary = _train(tmp_path, digits, log)
  assert any(l.startswith(f"resuming from checkpoint at step {step} ") for l in log), log
  assert _records(tmp_path) == reference[0]
  assert_trees(trainer.load_run(tmp_path)[2], reference[1])
  assert summary["test_accuracy_stochastic_runs"] == reference[2]["test_accuracy_stochastic_runs"]


def test_a_second_signal_during_the_stop_checkpoint_stops_at_once(tmp_path, digits, monkeypatch,
                                                                   reference):
  # SIGTERM after step 14, and again while step 14's checkpoint is being written.
  real_save = checkpoint.Checkpointer.save

  def save(self, step, *a, **kw):
    real_save(self, step, *a, **kw)
    if step == 14:
      _kill()  # the save has started (orbax writes in the background): interrupted mid-write

  with monkeypatch.context() as mp:
    _patch_setup(mp, _at_step(14, _kill))
    mp.setattr(checkpoint.Checkpointer, "save", save)
    with pytest.raises(stopping.StopNow):
      _train(tmp_path, digits)
  assert (tmp_path / "run.lock").read_text() == ""
  # The checkpoint before it is intact (step 12: orbax finishes a save before it starts
  # the next), while step 14's may still be written in the background; the rerun in this
  # process waits for that save, then ends as the uninterrupted run.
  assert trainer.load_run(tmp_path, step=12)[3] == 12
  _train(tmp_path, digits)
  assert _records(tmp_path) == reference[0]
  assert_trees(trainer.load_run(tmp_path)[2], reference[1])
  assert not list((tmp_path / "checkpoints").glob("*tmp*"))


def test_sigterm_to_the_script_exits_75_with_one_line_and_the_same_command_resumes(
    tmp_path, reference):
  w = tmp_path / "run"
  cmd = [sys.executable, "-u", "experiments/train.py", *CLI, "--workdir", str(w)]
  root = Path(__file__).resolve().parents[1]
  p = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  threading.Timer(180, p.kill).start()  # whatever happens, reading its output ends
  try:
    for line in p.stdout:  # SIGTERM once the first epoch is logged
      if line.startswith("epoch 1/3"):
        p.send_signal(signal.SIGTERM)
        break
    out, err = p.communicate(timeout=120)
  finally:
    p.kill()
  assert p.returncode == stopping.EXIT_STOPPED, err
  last = out.strip().splitlines()[-1]
  assert last.startswith("stopped at step ") and "on SIGTERM" in last, out
  assert "Traceback" not in err
  stopped = wd.read_stop(w / "metrics.jsonl")["step"]
  assert PER_EPOCH <= stopped < 3 * PER_EPOCH
  assert (w / "run.lock").read_text() == ""

  done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert f"resuming from checkpoint at step {stopped} " in done.stdout
  assert _records(w) == reference[0]
  assert_trees(trainer.load_run(w)[2], reference[1])
