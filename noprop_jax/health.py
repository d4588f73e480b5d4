"""The checkpoint health policy: every checkpoint is finite, and so is the step after it.

A run stops (`NonFiniteLossError`, naming the last good checkpoint and what to change)
where the loss is non-finite, an update was refused as non-finite, or the state is not
all finite. A state is checkpointed only once the next step's loss on it is known
finite (`hold`, then `release`): resuming from a state that training diverges from at
once would diverge again. `run` is the trainer's `Run` (its checkpointer, settings,
compiled finiteness check and held state).
"""

import math
from typing import Any

import jax


class NonFiniteLossError(FloatingPointError):
  pass


def data_meta(model) -> dict[str, Any]:
  """The data's shapes, saved with every checkpoint: `load_run` rebuilds the model from them."""
  return {"input_shape": list(model.input_shape), "num_classes": model.num_classes}


def check(run, loss, skipped, step: int, state=None) -> None:
  """Stop, naming the last good checkpoint, if the loss so far is non-finite, an update
  was refused as non-finite, or (when given) the state is not all finite. Every
  checkpoint is written only after this check, so every checkpoint is finite."""
  loss, skipped, ok = jax.device_get((loss, skipped, True if state is None else run.all_finite(state)))
  if math.isfinite(float(loss)) and float(skipped) == 0 and bool(ok):
    return
  what = ("a non-finite training loss" if not math.isfinite(float(loss)) else
          f"{int(skipped)} non-finite update(s) (refused)" if float(skipped) else
          "non-finite parameters")
  last = run.ckpt.finished_step()
  tr = run.cfg.train
  where = (f"the last good checkpoint is step {last} in {run.ckpt.dir} (a checkpoint is "
           "written only once its state and the next step's loss on it are finite)" if last is not None
           else "no checkpoint had been written yet")
  raise NonFiniteLossError(
      f"training diverged: {what} by step {step}; stopped without saving: {where}. Rerun the "
      f"same command with a lower learning rate (e.g. --lr {tr.lr / 10:g}) or a smaller "
      f"--grad-clip to {'resume from it' if last is not None else 'start again'}: the optimizer "
      "settings may change on resume, and the change is recorded in config.json")


def hold(run, step: int, state, meta: dict[str, Any]) -> None:
  """Keep a copy of the (checked) state at `step`, to checkpoint once the next step's loss
  on it is finite: a finite state can still be one that training diverges from at once
  (parameters blown up by a too-large step), and resuming from it would diverge again."""
  run.held = (step, jax.tree.map(lambda a: a.copy(), state), {**meta, **data_meta(run.model)})


def release(run, loss, skipped, step: int) -> None:
  """Checkpoint the held state, now that `loss` (the step after it) is known finite; a
  NonFiniteLossError instead, dropping it."""
  if run.held is not None:
    held, run.held = run.held, None
    check(run, loss, skipped, step)
    run.ckpt.save(*held, copy=False)
