"""Orbax checkpoints of the training state, plus the workdir's config guard."""

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# Settings that change how a step executes, not what it computes (or, for
# epochs, only how long training goes on): a workdir may be resumed with others.
RESUMABLE_CHANGES = ("epochs", "formulation", "conv_impl", "blocks_per_step", "mesh",
                     "precision", "inference_runs", "inference_steps", "ct_sampler", "eval_every")


class ConfigMismatchError(RuntimeError):
  pass


def _flat(config: dict[str, Any]) -> dict[str, Any]:
  """{'train': {'lr': ...}, 'method': 'dt'} -> {'lr': ..., 'method': 'dt'} (names are unique)."""
  return {k2: v2 for k, v in config.items()
          for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}


def guard_config(workdir: Path, config: dict[str, Any]) -> None:
  """Write workdir/config.json, or refuse if it holds a different run's config (settings
  compared by name, whatever their concern)."""
  path = workdir / "config.json"
  if path.exists():
    try:
      saved = _flat(json.loads(path.read_text()))
    except (json.JSONDecodeError, AttributeError) as e:
      raise ConfigMismatchError(f"{path} is corrupt ({e}); use a fresh --workdir") from None
    now = _flat(config)
    # The adjoint trains with its solver steps: for it, inference_steps is not inference-only.
    resumable = [k for k in RESUMABLE_CHANGES
                 if not (k == "inference_steps" and now.get("method") == "adjoint")]
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k not in resumable}
    diff.update({k: (v, None) for k, v in saved.items() if k not in now})
    if diff:
      lines = "\n".join(f"  {k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ConfigMismatchError(
          f"{workdir} holds a run with a different config:\n{lines}\n"
          f"Use another --workdir, or rerun with the saved settings to resume "
          f"(only {', '.join(RESUMABLE_CHANGES)} may change).")
  path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class Checkpointer:
  """Keeps the last two checkpoints of (state, meta) under workdir/checkpoints."""

  def __init__(self, workdir: Path):
    self.manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def latest_step(self) -> int | None:
    """The last checkpoint written completely (a save in flight does not count)."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save of a private copy of `state` and returns.

    The copy matters: training donates `state` to the next step, which may
    overwrite its buffers while orbax is still writing them.
    """
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

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
