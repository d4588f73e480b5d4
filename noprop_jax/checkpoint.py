"""Orbax checkpoints of the training state: falling back past a damaged one, room for
them checked before training, and a full disk mid-run stopped with a one-line error."""

import contextlib
import shutil
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from noprop_jax import disk
from noprop_jax.workdir import DiskFullError, WorkdirError

PARTIAL = "*.orbax-checkpoint-tmp*"  # orbax's name for a step directory being written


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, leaving JAX's preemption sync point to the trainer: orbax would
  also ask it, with checkpoint steps, and JAX's service agrees on a step after the last
  one asked, which the trainer (asking at every step) could then never reach."""

  def reached_preemption(self, step: int) -> bool:
    return False


class Checkpointer:
  """Keeps the last `keep` checkpoints of (state, meta) under workdir/checkpoints.

  A save that fails for lack of space raises a DiskFullError wherever orbax reports it
  (`save`, `finished_step`, `close`, any wait for the save in flight), once the save's
  partial files are removed: the earlier checkpoints are intact, and a rerun resumes.
  """

  def __init__(self, workdir: Path, keep: int = 2, cleanup: bool = False):
    """`cleanup`: first delete the partial checkpoints of a run killed mid-save (for the
    run that writes: a reader may run beside a training run's save in flight)."""
    self.workdir = Path(workdir)
    self.dir = (self.workdir / "checkpoints").absolute()
    self.keep = keep
    self.manager = _Manager(self.dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=cleanup))
    self.size: int | None = None  # one checkpoint's bytes on disk (`checkpoint_bytes`)
    self._in_flight: int | None = None  # the step of the save not waited for yet
    self._failed = False  # a save failed for lack of space (reported once, by a DiskFullError)
    self._quiet = None  # while orbax's reports of a full disk are dropped: how to stop

  def check_space(self, state: Any) -> None:
    """Refuse to start (DiskFullError) unless the filesystem has room for the checkpoints
    of `state` (arrays or shapes) that this run writes (`needed`). On several hosts
    process 0 measures (once its cleanup of partial checkpoints is done) and all decide
    by its figures, so that all refuse alike."""
    self.size = disk.checkpoint_bytes(state)
    # The space of a killed run's partial checkpoints counts: wait for their removal.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    need, free = self.needed(self.keep), disk.free_bytes(self.dir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      free = int(multihost_utils.broadcast_one_to_all(np.float64(free) / 2**20) * 2**20)
    if need <= free:
      return
    have = len(self.manager.all_steps())
    error = DiskFullError(
        f"not enough disk space for the checkpoints in --workdir {self.workdir} (filesystem "
        f"mounted at {disk.mount_point(self.dir)}): {disk.human(need)} needed "
        f"({need // self.size} x {disk.human(self.size)}: --keep-checkpoints {self.keep} plus "
        f"the next while it is written{f', less the {have} there' if have else ''}), "
        f"{disk.human(free)} free; free space there, "
        f"use another --workdir{self._fewer(need)}")
    self.manager.close()  # refused: nothing more to do with it
    raise error

  def needed(self, keep: int) -> int:
    """The bytes that keeping `keep` checkpoints still needs: orbax writes a new one whole
    before it deletes the oldest past `keep`, so keep + 1 at the peak, less those already
    there (and at least the next)."""
    return max(1, keep + 1 - len(self.manager.all_steps())) * self.size

  def _fewer(self, need: int) -> str:
    """The advice to keep fewer checkpoints, where that needs less."""
    one = self.needed(1)
    return (f", or keep fewer checkpoints (--keep-checkpoints 1 needs {disk.human(one)})"
            if one < need else "")

  def latest_step(self) -> int | None:
    """The last checkpoint written completely (a save in flight does not count)."""
    return self.manager.latest_step()

  def finished_step(self) -> int | None:
    """The last checkpoint, once every save in flight has completed."""
    self._wait()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], copy: bool = True) -> None:
    """Starts an asynchronous save of a private copy of `state` and returns (`copy=False`:
    `state` is one already, which nothing else will touch).

    The copy matters: training donates `state` to the next step, which may
    overwrite its buffers while orbax is still writing them.
    """
    if copy:
      state = jax.tree.map(lambda a: a.copy(), state)
    if self.size is None:
      self.size = disk.checkpoint_bytes(state)
    self._quieting(True)
    self._wait()  # the previous save: a failure there is its own step's
    with self._reporting(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    self._in_flight = step

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON saved beside the state at `step`, without restoring the state."""
    self._wait()
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    self._wait()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_latest(self, like: Callable[[dict[str, Any]], Any] | Any,
                     warn: Callable[[str], None], set_aside: bool = True):
    """(step, state, meta) of the newest checkpoint that restores, or None if there is none.

    `like` is a template state, or a function of the checkpoint's meta giving one. A
    checkpoint that fails to restore (a truncated or corrupt file) is skipped with a
    warning and, with `set_aside`, moved to workdir/damaged-checkpoints/ (kept, not
    deleted) so that training can write that step again.
    """
    self._wait()
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        meta = self.meta(step)
        state, meta = self.restore(step, like(meta) if callable(like) else like)
        return step, state, meta
      except Exception as e:  # orbax and tensorstore raise many kinds for a damaged file
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        moved = self._set_aside(step) if set_aside else None
        warn(f"warning: checkpoint at step {step} in {self.dir} cannot be restored ({reason})"
             + (f"; moved it to {moved}" if moved else "") + "; trying an earlier one")
    if steps:
      raise WorkdirError(f"no checkpoint in {self.dir} can be restored (steps {steps}, all "
                         "damaged" + (f", moved to {self.workdir / 'damaged-checkpoints'})"
                                      if set_aside else ")")
                         + "; rerun to train again from step 0, or use another --workdir")
    return None

  def _set_aside(self, step: int) -> Path:
    dest = self.workdir / "damaged-checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(exist_ok=True)
    shutil.move(str(self.dir / str(step)), dest)
    self.manager.reload()
    return dest

  def close(self) -> None:
    """Wait for the save in flight (a DiskFullError if it failed for lack of space), close."""
    try:
      if not self._failed:
        self._wait()
    finally:
      try:
        with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
          self.manager.close()  # a failed save is reported once, not again here
      finally:
        self._quieting(False)

  def _wait(self) -> None:
    """Wait for the save in flight: where orbax reports a failure in its background."""
    with self._reporting(self._in_flight):
      self.manager.wait_until_finished()
    self._in_flight = None

  @contextlib.contextmanager
  def _reporting(self, step: int | None):
    """Around orbax's calls that report a failed save of `step`: one that failed for lack
    of space becomes a DiskFullError, once its partial files are removed."""
    try:
      yield
    except Exception as e:
      if not disk.is_disk_full(e):
        raise
      self._failed = True
      raise self._disk_full(step) from e

  def _disk_full(self, step: int | None) -> DiskFullError:
    with contextlib.suppress(Exception):  # orbax's threads done with the files first
      self.manager.wait_until_finished()
    disk.settle_failed_writes()
    if jax.process_index() == 0:  # the writer of the shared files
      self._remove_partial()
    with contextlib.suppress(Exception):
      self.manager.reload()  # the steps on disk: the failed one is not among them
    last, need = self.manager.latest_step(), self.needed(self.keep)
    resume = (f"the previous checkpoint (step {last}) is intact: free space there (resuming "
              f"needs {disk.human(need)}), then rerun the same command to resume from it"
              if last is not None else "no checkpoint was written before it: free space there "
              f"(starting again needs {disk.human(need)}), then rerun the same command")
    return DiskFullError(
        f"disk full: the checkpoint {f'of step {step}' if step is not None else 'in flight'} could not be "
        f"written to {self.dir} (filesystem mounted at {disk.mount_point(self.dir)}: "
        f"{disk.human(disk.free_bytes(self.dir))} free now, a checkpoint needs "
        f"{disk.human(self.size)}); its "
        f"partial files are removed and {resume}{self._fewer(need)}, or use another --workdir")

  def _remove_partial(self) -> None:
    """Delete the step directories orbax was writing. A write still in flight when the
    save failed may yet create a file in one: removed again, until none is left."""
    for _ in range(20):
      left = list(self.dir.glob(PARTIAL))
      if not left:
        return
      for path in left:
        shutil.rmtree(path, ignore_errors=True)
      time.sleep(0.05)

  def _quieting(self, on: bool) -> None:
    """Drop orbax's own reports of a full disk from the first save to `close` (or to
    this Checkpointer's collection, where a run stopped at once never closes it)."""
    if on and self._quiet is None:
      disk.quiet_on()
      self._quiet = weakref.finalize(self, disk.quiet_off)
    elif not on and self._quiet is not None:
      if self._failed:
        disk.settle_failed_writes()  # and those that failed since
      self._quiet()
      self._quiet = None
