"""Stopping a run cleanly: on SIGTERM or SIGINT, or when asked from Python.

A preempted TPU VM or spot GPU gets SIGTERM some seconds before it is taken, SLURM sends
it before a time limit, and Ctrl-C (or a notebook's interrupt button) sends SIGINT.
While `trainer.train` runs, the first of these signals asks for a stop: the step in
flight finishes, a checkpoint of that step is written and verified, metrics.jsonl says
how far the run got, the workdir's lock is released, and `train` raises `Stopped`
(`experiments/train.py` prints one line and exits with `EXIT_STOPPED`). Running the
same command again resumes from that step. A second signal stops at once (`StopNow`, a
KeyboardInterrupt), leaving the checkpoints written before it intact.

From Python, `request()` asks for the same stop: from a callback, another thread, or a
notebook cell's timer. In a notebook the interrupt button sends SIGINT, so the first
press stops cleanly and a second press stops at once.

On several hosts the processes must stop at the same step, since they checkpoint
together. There JAX's own preemption service owns SIGTERM (`jax.distributed.initialize`
installs it): a SIGTERM to any process reaches all of them, and
`multihost_utils.reached_preemption_sync_point` turns true on every process at the same
step. SIGINT and `request()` are passed on to that service as a SIGTERM to this process.
There a second SIGINT stops at once; SIGTERM always stops cleanly (every host may get one,
at slightly different times, as when SLURM signals all tasks), and SIGKILL at once.
"""

import contextlib
import signal
import threading
from typing import Iterator

EXIT_STOPPED = 75  # a clean stop on request (EX_TEMPFAIL: "try again" resumes the run)


class StopNow(KeyboardInterrupt):
  """A second signal: the run stops at once, without waiting for a checkpoint in flight
  (its partial files are removed by the next run; the checkpoints before it are intact)."""


class Stopped(Exception):
  """The run stopped on request at `step`, with a verified checkpoint of that step.
  Running it again resumes."""

  def __init__(self, step: int, reason: str, message: str):
    super().__init__(message)
    self.step, self.reason = step, reason


_lock = threading.RLock()  # re-entered when a signal lands while `request` holds it
_reason: str | None = None  # why a stop was asked for; None while none is
_count = 0  # signals received while handled: the second stops at once


def request(reason: str = "request") -> None:
  """Ask the training run in this process to stop cleanly after its current step.

  Safe from any thread. On several hosts the request reaches every process (through
  JAX's preemption service), and they stop together."""
  global _reason
  with _lock:
    first = _reason is None
    _reason = _reason or reason
  if first and multi_host():
    signal.raise_signal(signal.SIGTERM)  # into JAX's preemption notifier (see above)


def requested() -> str | None:
  """Why a stop was asked for in this process, or None."""
  return _reason


def clear() -> None:
  """Forget a stop request (a new run starts with none)."""
  global _reason, _count
  with _lock:
    _reason, _count = None, 0


def multi_host() -> bool:
  """Whether this process is one of several joined by `jax.distributed` with JAX's
  preemption service running (then that service decides when all stop)."""
  try:  # only a module attribute (what multihost_utils itself reads): no backend starts
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):  # another JAX: as on one host
    return False


class Check:
  """Asked once per training step, in step order: whether to stop after this step.

  One process: whether a stop was requested. Several hosts: whether all processes have
  reached the step JAX's preemption service agreed on (every process asks at every
  step, so they agree on the step)."""

  def __init__(self):
    self.multi = multi_host()

  def __call__(self, step: int) -> str | None:
    if not self.multi:
      return _reason
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      return _reason or "SIGTERM to one of the processes"
    return None

  def at_boundary(self) -> str | None:
    """Between steps (after an epoch's evaluation): a request seen only here cannot be
    agreed on by several hosts, who stop at the next step instead."""
    return None if self.multi else _reason


def _signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def _handler(signum, frame):
  global _count
  _count += 1
  if _count > 1:  # a second signal: stop at once
    raise StopNow(f"{_signal_name(signum)} again: stopped at once")
  request(_signal_name(signum))


@contextlib.contextmanager
def handled() -> Iterator[None]:
  """While inside, SIGTERM and SIGINT ask for a clean stop (the second stops at once);
  the previous handlers come back after. Outside the main thread (where Python cannot
  set handlers) only `request()` stops the run."""
  clear()
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  # On several hosts SIGTERM stays JAX's (its preemption service); SIGINT is passed on.
  signums = (signal.SIGINT,) if multi_host() else (signal.SIGINT, signal.SIGTERM)
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  for s in signums:
    signal.signal(s, _handler)
  try:
    yield
  finally:
    # Held back while the handlers are put back (a signal now would find half of them
    # ours), then delivered to the previous ones.
    block = getattr(signal, "pthread_sigmask", None)
    held = block(signal.SIG_BLOCK, signums) if block else None
    try:
      for s in signums:
        signal.signal(s, before[s])
      clear()
    finally:
      if block:
        block(signal.SIG_SETMASK, held)
