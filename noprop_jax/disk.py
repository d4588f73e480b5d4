"""The disk a run's checkpoints need, and a full disk reported once.

`checkpoint_bytes` is one checkpoint's size, known from the state; `free_bytes` the space
left on a filesystem; `is_disk_full` tells a write refused for lack of space from other
failures, however orbax and tensorstore report it. `quiet_on`/`quiet_off` and
`settle_failed_writes` silence orbax's own many reports of such a failure, so that the one DiskFullError the
Checkpointer raises says it.
"""

import asyncio
import errno
import gc
import inspect
import logging
import math
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import jax

# A checkpoint's bytes beside its arrays' (orbax 0.12.8): its own small files and
# directories, and per array its metadata entries. tests/test_disk.py checks the estimate
# against a written checkpoint's `du`.
FIXED_BYTES = 64 << 10
BYTES_PER_ARRAY = 1 << 10


def free_bytes(path: Path) -> int:
  """Free space on `path`'s filesystem, for this user (the one probe: tests replace it)."""
  return shutil.disk_usage(path).free


def checkpoint_bytes(state: Any) -> int:
  """One checkpoint's size on disk, from the state (arrays or shapes): each global array
  once, as orbax writes it (a key as its key data), plus its metadata. Close, and rather
  over than under: orbax compresses trained float weights by a few per cent."""
  is_key = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
  raw = lambda s: jax.tree.map(lambda a: jax.random.key_data(a) if is_key(a) else a, s)
  leaves = jax.tree.leaves(jax.eval_shape(raw, state))
  return (sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
          + FIXED_BYTES + BYTES_PER_ARRAY * len(leaves))


def human(n: float) -> str:
  """Bytes in the largest binary unit under 1024 of it: '56.1 MiB'."""
  for unit in ("bytes", "KiB", "MiB", "GiB"):
    if abs(n) < 1024:
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def mount_point(path: Path) -> Path:
  path = Path(path).resolve()
  while not os.path.ismount(path):
    path = path.parent
  return path


def is_disk_full(e: BaseException | None) -> bool:
  """Whether `e`, or an exception in its chain, is a write refused for lack of space: an
  OSError (ENOSPC, EDQUOT), or tensorstore's report of one through orbax (a ValueError
  'RESOURCE_EXHAUSTED: ... No space left on device')."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if _full_text(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _full_text(text: str) -> bool:
  # The system's own words (strerror), which tensorstore quotes: not RESOURCE_EXHAUSTED
  # alone, which also means out of memory or a storage service's rate limit.
  return "No space left on device" in text or "Disk quota exceeded" in text


# ----------------------------------------------------------------------------- quiet failures
# A write that fails in orbax's background threads is reported there many times over
# before anyone waits for the save: absl ERROR logs with tracebacks from each thread,
# asyncio's "exception was never retrieved" as the failed futures are collected, and an
# "Event loop is closed" traceback per tensorstore write still in flight (orbax closes the
# writes' event loop as soon as one fails; the others' callbacks then find it closed).
# For a full disk, the DiskFullError raised at the wait says it once: while a Checkpointer
# is writing, log records about a full disk and the "Event loop is closed" reports of
# orbax's writes are dropped; nothing else. Nothing changes at import.

class _DropDiskFull(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    try:
      text = record.getMessage()
    except Exception:  # a malformed record: let its handler report it
      return True
    return not (_full_text(text) or is_disk_full(record.exc_info[1] if record.exc_info else None))


_QUIET_LOGGERS = ("absl", "asyncio")
_DROP = _DropDiskFull()
_quiet_lock = threading.Lock()
_quiet = {"writers": 0, "hook": None}


def _unraisable(u) -> None:
  tb, names = u.exc_traceback, set()
  while tb is not None:
    names.add(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  closed = (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
            and "call_soon_threadsafe" in names)
  if not closed:
    (_quiet["hook"] or sys.__unraisablehook__)(u)


def quiet_on() -> None:
  """Drop orbax's reports of a full disk from now on (counted: until as many `quiet_off`)."""
  with _quiet_lock:
    if _quiet["writers"] == 0:
      for name in _QUIET_LOGGERS:
        logging.getLogger(name).addFilter(_DROP)
      _quiet["hook"], sys.unraisablehook = sys.unraisablehook, _unraisable
    _quiet["writers"] += 1


def quiet_off() -> None:
  """Undo one `quiet_on`; the last restores the loggers and the unraisable hook."""
  with _quiet_lock:
    _quiet["writers"] -= 1
    if _quiet["writers"] == 0:
      for name in _QUIET_LOGGERS:
        logging.getLogger(name).removeFilter(_DROP)
      if sys.unraisablehook is _unraisable:  # else replaced since: not ours to restore
        sys.unraisablehook = _quiet["hook"]
      _quiet["hook"] = None


def settle_failed_writes() -> None:
  """Settle what orbax's failed writes leave behind, each to be reported when collected
  (at exit, long after the DiskFullError). Its gather stops at the first failure and its
  event loop closes: the other writes' futures hold exceptions never retrieved ("exception
  was never retrieved"), and their tasks can never run again ("Task was destroyed but it
  is pending", and "coroutine ... was never awaited" for those not started)."""
  for obj in gc.get_objects():
    if not isinstance(obj, asyncio.Future):
      continue
    if obj.done():
      if not obj.cancelled() and is_disk_full(getattr(obj, "_exception", None)):
        obj.exception()  # marks it retrieved
    elif isinstance(obj, asyncio.Task) and obj.get_loop().is_closed():
      coro = obj.get_coro()
      if inspect.iscoroutine(coro) and "orbax" in coro.cr_code.co_filename:
        obj._log_destroy_pending = False  # dead with its loop: nothing to report
        if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
          coro.close()  # never started: closing it runs nothing
