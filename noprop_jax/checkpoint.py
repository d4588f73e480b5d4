"""Orbax checkpoints of the training state, and falling back past a damaged one."""

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from noprop_jax.workdir import WorkdirError


class Checkpointer:
  """Keeps the last two checkpoints of (state, meta) under workdir/checkpoints."""

  def __init__(self, workdir: Path):
    self.workdir = Path(workdir)
    self.dir = (self.workdir / "checkpoints").absolute()
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def latest_step(self) -> int | None:
    """The last checkpoint written completely (a save in flight does not count)."""
    return self.manager.latest_step()

  def finished_step(self) -> int | None:
    """The last checkpoint, once every save in flight has completed."""
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], copy: bool = True) -> None:
    """Starts an asynchronous save of a private copy of `state` and returns (`copy=False`:
    `state` is one already, which nothing else will touch).

    The copy matters: training donates `state` to the next step, which may
    overwrite its buffers while orbax is still writing them.
    """
    if copy:
      state = jax.tree.map(lambda a: a.copy(), state)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON saved beside the state at `step`, without restoring the state."""
    self.manager.wait_until_finished()
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    self.manager.wait_until_finished()
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
    self.manager.wait_until_finished()
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
    self.manager.wait_until_finished()
    self.manager.close()
