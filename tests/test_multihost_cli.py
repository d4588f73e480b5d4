"""experiments/train.py on several hosts, from the command line: two real processes on
localhost (2 simulated CPU devices each, a mesh over all 4), joined by the coordinator
given as flags (process 0) and as JAX_* variables (process 1); what a missing or wrong
setting says; what the survivor of a kill -9 does; and that rerunning both resumes.

One pair of commands checks it all in turn, to keep the file short: killed once each way,
rerun each time, one process sent SIGTERM (both stop at one step), and the last rerun
trains to the end.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

TRAIN = Path(__file__).resolve().parents[1] / "experiments" / "train.py"
RUN = ("--block", "mlp", "--hidden", "32", "--T", "2", "--batch-size", "64",
       "--mesh", "blocks=2,data=2", "--inference-runs", "2", "--no-progress")
EPOCHS = 14  # 8 steps each, ~0.4 s: the run still goes on for seconds when it is killed
LOST_BOUND = 30  # seconds from a kill to the survivor's exit (documented; ~0.1 s measured)
TIMEOUT = 180  # seconds for one pair of processes
# What would let JAX detect a cluster, or give the coordinator, other than the test does.
CLUSTER_ENV = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_",
               "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_")

pytestmark = pytest.mark.skipif(
    not {"jax_cpu_collectives_implementation", "jax_num_cpu_devices"} <= set(jax.config.values),
    reason="this jax has no collectives between CPU processes")


def last_checkpoint(workdir: Path) -> int | None:
  """The newest checkpoint all processes finished (orbax names its directory by its step)."""
  return max((int(p.name) for p in workdir.glob("checkpoints/*") if p.name.isdigit()),
             default=None)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra) -> dict:
  # gRPC would send even 127.0.0.1 through a configured proxy. The conftest's XLA_FLAGS
  # (fast compilation) and compilation cache pass on.
  env = {k: v for k, v in os.environ.items()
         if not k.lower().endswith("_proxy") and not k.startswith(CLUSTER_ENV)}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONUNBUFFERED="1", **extra)
  return env


@pytest.fixture
def dataset(tmp_path, digits) -> Path:
  path = tmp_path / "data.npz"  # 8 steps of 64 an epoch, a test split of 120
  np.savez(path, x_train=digits.train.images[:512], y_train=digits.train.labels[:512],
           x_test=digits.test.images[:120], y_test=digits.test.labels[:120])
  return path


class Pair:
  """Process 0 given the coordinator by flags, process 1 by JAX_* variables; each run
  starts both, and kills them all if the test fails."""

  def __init__(self, tmp_path: Path, dataset: Path, workdir: Path):
    self.tmp, self.workdir, self.runs = tmp_path, workdir, 0
    self.args = [sys.executable, str(TRAIN), *RUN, "--dataset", str(dataset),
                 "--epochs", str(EPOCHS), "--workdir", str(workdir)]
    self.procs: list[subprocess.Popen] = []

  def start(self) -> None:
    self.runs += 1
    address = f"127.0.0.1:{_free_port()}"
    flags = ["--coordinator-address", address, "--num-processes", "2", "--process-id", "0"]
    envs = dict(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    self.procs = [self._popen(0, self.args + flags, _env()),
                  self._popen(1, self.args + ["--distributed"], _env(**envs))]

  def _popen(self, i: int, args: list, env: dict) -> subprocess.Popen:
    out, err = (self.log(i, s).open("w") for s in ("out", "err"))
    with out, err:
      return subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True)

  def log(self, i: int, stream: str) -> Path:
    return self.tmp / f"run{self.runs}-p{i}.{stream}"

  def text(self, i: int, stream: str = "err") -> str:
    return self.log(i, stream).read_text()

  def wait(self, i: int, deadline: float) -> int:
    while self.procs[i].poll() is None:
      if time.monotonic() > deadline:
        raise AssertionError(f"process {i} still running:\n{self.tails()}")
      time.sleep(0.05)
    return self.procs[i].returncode

  def wait_for_checkpoint(self, deadline: float, after: int = -1) -> None:
    """Until a checkpoint all processes finished (of a step > `after`) is there, while
    both still run."""
    while (last_checkpoint(self.workdir) or -1) <= after:
      if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
        raise AssertionError(f"no checkpoint while both ran:\n{self.tails()}")
      time.sleep(0.05)

  def finish(self) -> None:
    """Both processes end with exit 0, process 0 having resumed."""
    deadline = time.monotonic() + TIMEOUT
    for i in (0, 1):
      assert self.wait(i, deadline) == 0, self.tails()
    assert "test accuracy" in self.text(0, "out"), self.tails()

  def tails(self) -> str:
    return "\n".join(f"--- process {i} (exit {p.poll()}) {s}:\n{self.text(i, s)[-3000:]}"
                     for i, p in enumerate(self.procs) for s in ("out", "err"))

  def kill_all(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture
def pair(tmp_path, dataset):
  p = Pair(tmp_path, dataset, tmp_path / "run")
  yield p
  p.kill_all()


def _resumed_step(pair: Pair) -> int:
  m = re.search(r"^resuming from checkpoint at step (\d+)", pair.text(0, "out"), re.M)
  assert m, pair.tails()
  return int(m.group(1))


def _no_trace(text: str) -> None:
  assert "Traceback" not in text and "Check failure" not in text, text[-3000:]


def test_a_lost_process_stops_the_others_and_the_same_commands_resume(pair):
  # 1. kill -9 of process 1: process 0 stops soon, with one line naming it.
  pair.start()
  deadline = time.monotonic() + TIMEOUT
  pair.wait_for_checkpoint(deadline)
  pair.procs[1].kill()
  killed = time.monotonic()
  code = pair.wait(0, deadline)
  took = time.monotonic() - killed
  err = pair.text(0)
  assert code == 69, pair.tails()
  assert took < LOST_BOUND, f"{took:.1f} s"
  _no_trace(err)
  [line] = [l for l in err.splitlines() if l.startswith("error:")]
  assert err.rstrip().endswith(line)  # the last word, nothing after it
  m = re.fullmatch(r"error: process 1 of 2 was lost \(it stopped or its host went away\); "
                   r"stopping this process too\. The last checkpoint all processes finished "
                   r"is step (\d+) in (.+): rerun the same command on every host to resume "
                   r"from it\.", line)
  assert m and m.group(2) == str(pair.workdir / "checkpoints"), line
  print(f"process 0 exited {took:.1f} s after process 1's kill -9; its stderr ends: {line}")

  # 2. The same commands resume from that checkpoint. kill -9 of process 0 after the next:
  # JAX's runtime ends process 1 (or its lifeline, first, with the line naming process 0).
  pair.start()
  pair.wait_for_checkpoint(time.monotonic() + TIMEOUT, after=int(m.group(1)))
  assert _resumed_step(pair) == int(m.group(1))
  step = last_checkpoint(pair.workdir)
  pair.procs[0].kill()
  killed = time.monotonic()
  code = pair.wait(1, time.monotonic() + TIMEOUT)
  assert code != 0, pair.tails()
  print(f"process 1 exited {time.monotonic() - killed:.1f} s after process 0's kill -9 "
        f"(exit {code}); its stderr ends: {pair.text(1).rstrip().splitlines()[-1]}")

  # 3. SIGTERM to process 1 (a preempted host), and a moment later to process 0 too (as
  # SLURM signals every task, not all at once): both stop cleanly at one step, each saying
  # so, with exit 75; the stop's checkpoint is that step's.
  pair.start()
  pair.wait_for_checkpoint(time.monotonic() + TIMEOUT, after=step)
  pair.procs[1].send_signal(signal.SIGTERM)
  time.sleep(0.8)
  if pair.procs[0].poll() is None:
    pair.procs[0].send_signal(signal.SIGTERM)
  deadline = time.monotonic() + TIMEOUT
  assert [pair.wait(i, deadline) for i in (0, 1)] == [75, 75], pair.tails()
  said = [re.findall(r"^stopped at step (\d+) .*run the same command again to resume from it$",
                     pair.text(i, "out"), re.M) for i in (0, 1)]
  assert said[0] == said[1] and len(said[0]) == 1, pair.tails()
  stopped = int(said[0][0])
  assert last_checkpoint(pair.workdir) == stopped
  assert json.loads((pair.workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == stopped
  for i in (0, 1):
    _no_trace(pair.text(i))

  # 4. And again: both train to the end, from that step.
  pair.start()
  pair.finish()
  assert _resumed_step(pair) == stopped
  for i in (0, 1):
    _no_trace(pair.text(i))


def _train(args, **env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(TRAIN), *args, "--no-progress"],
                          env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def test_what_cannot_be_joined_is_one_line(tmp_path):
  # (flags, environment, what the line says): started side by side, each takes seconds to import.
  cases = [
      (["--distributed"], {},
       r"the coordinator's address, the number of processes and this process's id are not "
       r"known \(no SLURM, Open MPI or TPU VM cluster.*--coordinator-address HOST:PORT "
       r"--num-processes N --process-id I.*JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
       r"JAX_PROCESS_ID"),
      (["--process-id", "2", "--num-processes", "2"], {},
       r"process id 2 is out of range for 2 processes: give each process an id from 0 to 1"),
      (["--distributed"], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"},
       r"this process's id is not known .*--process-id I.*JAX_PROCESS_ID"),
      (["--distributed"], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
                           "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
       r"JAX_NUM_PROCESSES is 'two', not a whole number"),
      (["--coordinator-address", "host0", "--num-processes", "2", "--process-id", "0"], {},
       r"--coordinator-address is 'host0', not HOST:PORT")]
  procs = [_train([*a, "--workdir", str(tmp_path / "run")], **e) for a, e, _ in cases]
  for p, (a, e, says) in zip(procs, cases):
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, (a, e, out, err)
    [line] = err.splitlines()  # one line, no traceback
    assert line.startswith("error: ") and re.search(says, line), (a, e, line)
  assert not (tmp_path / "run").exists()
