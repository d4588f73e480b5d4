"""A full disk: a run without room for its checkpoints refused before training, a
checkpoint that fails for lack of space mid-run stopped with one line (its partial files
removed, the previous checkpoint resumed exactly), how many checkpoints are kept, and the
size a checkpoint is estimated to take.

The real small disks are tmpfs mounts in a user namespace (`unshare -Urm`); where that is
not permitted the tests that need one are skipped, the in-process ones still run."""

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest

from conftest import assert_trees, build
from noprop_jax import disk
from noprop_jax.config import RunConfig
from noprop_jax.trainer import init_state, load_run, train
from noprop_jax.workdir import DiskFullError, WorkdirError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import train as train_cli  # noqa: E402

# A small MLP network: 11 steps per epoch, checkpoints of about 200 KiB.
SMALL = dict(dataset="digits", block="mlp", hidden=32, T=2, epochs=2, batch_size=128,
             inference_runs=1)
CLI = ["--T", "2", "--block", "mlp", "--hidden", "32", "--batch-size", "128",
       "--inference-runs", "1", "--no-progress"]
TIMING = ("seconds", "eval_seconds")


def _train(workdir, dataset, log=None, **kw):
  run_kw = {k: kw.pop(k) for k in ("checkpoint_every", "keep_checkpoints") if k in kw}
  return train(RunConfig.create("dt", **{**SMALL, **kw}), workdir, dataset=dataset,
               progress=False, print_fn=(log.append if log is not None else lambda s: None),
               **run_kw)


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _partial(workdir) -> list[str]:
  return [p.name for p in (Path(workdir) / "checkpoints").glob("*orbax-checkpoint-tmp*")]


def _records(workdir) -> list[dict]:
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in lines]


def _one_error_line(text: str) -> str:
  assert len(text.strip().splitlines()) == 1 and text.startswith("error: "), text
  return text.strip()


def _size() -> int:
  """One checkpoint's estimated bytes for SMALL, from its state's shapes."""
  cfg = RunConfig.create("dt", **SMALL)
  model = build(cfg)[1]
  return disk.checkpoint_bytes(
      jax.eval_shape(lambda: init_state(cfg, model, jax.random.key(0))))


# ----------------------------------------------------------------------------- a real small disk

def _tmpfs(tmp_path) -> Path:
  """A directory that a script run under `unshare -Urm` may mount a tmpfs on; the test is
  skipped where user namespaces or mounts in them are not permitted."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if shutil.which("unshare") is None:
    pytest.skip("no unshare(1) here: cannot mount a small tmpfs")
  probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m none {mnt}"],
                         capture_output=True, text=True)
  if probe.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()[:200]}")
  return mnt


def _in_namespace(script: str, mnt: Path, out: Path, timeout: int = 120):
  """Run `script` (sh) in a new user and mount namespace, with $MNT, $OUT (a host
  directory: the mount vanishes with the namespace), $TRAIN and $ARGS set."""
  env = {**os.environ, "MNT": str(mnt), "OUT": str(out), "PY": sys.executable,
         "TRAIN": str(Path(train_cli.__file__)), "ARGS": " ".join(CLI)}
  return subprocess.run(["unshare", "-Urm", "sh", "-c", "set -u\n" + script], env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_a_disk_too_small_is_refused_before_training_in_one_line(tmp_path):
  mnt = _tmpfs(tmp_path)
  out = _in_namespace('mount -t tmpfs -o size=512k none "$MNT" && '
                      '"$PY" "$TRAIN" $ARGS --epochs 2 --workdir "$MNT/w"', mnt, tmp_path)
  assert out.returncode == 1, out.stderr
  err = _one_error_line(out.stderr)
  assert "Traceback" not in out.stdout + out.stderr
  assert f"--workdir {mnt}/w (filesystem mounted at {os.path.realpath(mnt)})" in err, err
  assert "needed" in err and "free" in err and "--keep-checkpoints" in err, err


def test_a_disk_that_fills_mid_run_stops_in_one_line_and_the_rerun_resumes(tmp_path):
  mnt = _tmpfs(tmp_path)
  # Room for the checkpoints; once the first is written, a filler leaves 64 KiB (less than
  # a checkpoint): a later one fails. Then the filler goes, and the same command resumes.
  script = r'''
mount -t tmpfs -o size=2m none "$MNT" || exit 97
W="$MNT/w"; RUN="$PY $TRAIN $ARGS --epochs 4 --checkpoint-every 2 --workdir $W"
$RUN > "$OUT/out1" 2> "$OUT/err1" & PID=$!
until ls "$W/checkpoints" 2>/dev/null | grep -qx '[0-9]*' || ! kill -0 $PID; do sleep 0.01; done
FREE=$(df -B1 --output=avail "$MNT" | tail -1)
fallocate -l $((FREE - 65536)) "$MNT/filler"
wait $PID; echo $? > "$OUT/rc1"
ls "$W/checkpoints" > "$OUT/left"
rm "$MNT/filler"
$RUN > "$OUT/out2" 2> "$OUT/err2"; echo $? > "$OUT/rc2"
'''
  out = _in_namespace(script, mnt, tmp_path)
  assert out.returncode == 0, out.stdout + out.stderr
  read = lambda name: (tmp_path / name).read_text()
  assert read("rc1").strip() == "1", read("out1") + read("err1")
  err = _one_error_line(read("err1"))
  assert "Traceback" not in read("out1") + read("err1")
  assert "disk full: the checkpoint of step" in err and "could not be written" in err, err
  assert "is intact" in err and "rerun the same command to resume" in err, err
  left = read("left").split()
  assert left and all(name.isdigit() for name in left), left  # no partial checkpoint
  assert read("rc2").strip() == "0", read("err2")
  assert "Traceback" not in read("err2")
  assert "resuming from checkpoint at step" in read("out2")
  assert "test accuracy" in read("out2")


# ----------------------------------------------------------------------------- refused at start

def test_a_run_without_room_for_its_checkpoints_is_refused_before_training(
    tmp_path, digits, monkeypatch, capsys):
  size = _size()
  # Room for 2.5 checkpoints: keep 2 (3 at the peak) is refused, keep 1 (2) trains.
  monkeypatch.setattr(disk, "free_bytes", lambda path: int(2.5 * size))
  with pytest.raises(DiskFullError) as e:
    _train(tmp_path, digits)
  msg = str(e.value)
  assert isinstance(e.value, WorkdirError) and "\n" not in msg
  assert f"--workdir {tmp_path} (filesystem mounted at " in msg, msg
  assert (f"{disk.human(3 * size)} needed (3 x {disk.human(size)}: "
          "--keep-checkpoints 2 plus the next while it is written)") in msg, msg
  assert f"{disk.human(int(2.5 * size))} free" in msg, msg
  assert f"--keep-checkpoints 1 needs {disk.human(2 * size)}" in msg, msg
  assert not _steps(tmp_path) and not _partial(tmp_path)
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "metrics.jsonl").exists()
  # The command line: exit code 1, the same one line.
  assert train_cli.main([*CLI, "--epochs", "2", "--workdir", str(tmp_path)]) == 1
  assert _one_error_line(capsys.readouterr().err) == f"error: {msg}"
  # The advice, followed: one checkpoint kept fits.
  _train(tmp_path, digits, keep_checkpoints=1)
  assert _steps(tmp_path) == [22]
  # Checkpoints already there take their space: keep 2 now needs room for 2 more, not 3.
  s = _train(tmp_path, digits, epochs=3, keep_checkpoints=2)
  assert s["steps"] == 33 and _steps(tmp_path) == [22, 33]


# ----------------------------------------------------------------------------- full mid-run

@contextlib.contextmanager
def _disk_fills_at(step: int, where: str):
  """Inside, the checkpoint of `step` fails for lack of space, leaving partial files:
  where='save' as orbax's save starts (an OSError ENOSPC), where='wait' in the background,
  reported when the save is waited for (tensorstore's RESOURCE_EXHAUSTED, via orbax)."""
  real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
  failing = []

  def save(self, s, *args, **kw):
    if s == step and where == "save":
      partial = Path(self.directory) / f"{s}.orbax-checkpoint-tmp" / "state"
      partial.mkdir(parents=True)
      (partial / "d").write_bytes(b"\0" * 4096)
      raise OSError(errno.ENOSPC, "No space left on device")
    done = real_save(self, s, *args, **kw)
    if s == step:
      failing.append(self)
    return done

  def wait(self):
    real_wait(self)
    if self in failing:  # its files never committed: still under orbax's temporary name
      failing.remove(self)
      d = Path(self.directory)
      (d / str(step)).rename(d / f"{step}.orbax-checkpoint-tmp")
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local '
                       f'file "{d}/{step}.orbax-checkpoint-tmp/state/": Failed to write 4096 '
                       "bytes to file 5: No space left on device [os_error_code='28']")

  ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished = save, wait
  try:
    yield
  finally:
    ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished = real_save, real_wait


@pytest.mark.parametrize("where", ["save", "wait"])
def test_a_checkpoint_failing_for_space_stops_in_one_line_and_the_rerun_is_exact(
    where, tmp_path, digits, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  argv = [*CLI, "--epochs", "2", "--checkpoint-every", "4", "--workdir"]
  assert train_cli.main([*argv, str(a)]) == 0  # uninterrupted: checkpoints 4, 8, 11, 12, 16, ...
  argv, hook = [*argv, str(b)], sys.unraisablehook
  with _disk_fills_at(16, where):
    assert train_cli.main(argv) == 1
  err = _one_error_line(capsys.readouterr().err)
  assert "error: disk full: the checkpoint of step 16 could not be written" in err, err
  assert "the previous checkpoint (step 12) is intact" in err, err
  assert "free space there (resuming needs " in err, err
  assert "then rerun the same command to resume from it" in err, err
  assert not _partial(b) and _steps(b)[-1] == 12
  assert load_run(b)[3] == 12
  # Orbax's reports of the failure were dropped only while it wrote.
  assert sys.unraisablehook is hook
  assert not logging.getLogger("absl").filters and not logging.getLogger("asyncio").filters
  assert train_cli.main(argv) == 0
  assert "resuming from checkpoint at step 12" in capsys.readouterr().out
  (_, _, sa, step_a), (_, _, sb, step_b) = load_run(a), load_run(b)
  assert step_a == step_b == 22
  assert_trees(sb, sa)  # bit for bit
  assert _records(b) == _records(a)


# ----------------------------------------------------------------------------- kept checkpoints

@pytest.mark.parametrize("keep", [1, 3])
def test_the_number_of_checkpoints_kept_is_a_setting(keep, tmp_path, digits):
  _train(tmp_path, digits, epochs=1, checkpoint_every=3, keep_checkpoints=keep)  # 3, 6, 9, 11
  assert _steps(tmp_path) == [3, 6, 9, 11][-keep:]
  # A killed run's partial checkpoint: a reader leaves it, the next training run removes it.
  junk = tmp_path / "checkpoints" / "14.orbax-checkpoint-tmp" / "state"
  junk.mkdir(parents=True)
  (junk / "d").write_bytes(b"\0" * 100)
  assert load_run(tmp_path)[3] == 11 and _partial(tmp_path)
  _train(tmp_path, digits, epochs=1, checkpoint_every=3, keep_checkpoints=keep)
  assert not _partial(tmp_path) and _steps(tmp_path) == [3, 6, 9, 11][-keep:]


def test_keeping_no_checkpoint_is_refused(tmp_path, digits, capsys):
  with pytest.raises(ValueError, match="keep_checkpoints must be >= 1 .*got 0"):
    _train(tmp_path, digits, keep_checkpoints=0)
  assert train_cli.main([*CLI, "--keep-checkpoints", "0", "--workdir", str(tmp_path)]) == 2
  assert "--keep-checkpoints: must be >= 1, got 0" in _one_error_line(capsys.readouterr().err)
  assert not (tmp_path / "checkpoints").exists()


def test_the_size_estimate_is_within_20_percent_of_a_checkpoint_on_disk(tmp_path, digits):
  _train(tmp_path, digits, epochs=1)
  _, _, state, step = load_run(tmp_path)
  d = tmp_path / "checkpoints" / str(step)
  on_disk = sum(p.stat().st_blocks * 512 for p in [d, *d.rglob("*")])  # what `du` counts
  estimate = disk.checkpoint_bytes(state)
  assert estimate == _size()  # from the state's shapes alone
  assert abs(estimate - on_disk) <= 0.2 * on_disk, (estimate, on_disk)
