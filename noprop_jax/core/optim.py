"""The optimizers and the guarded training update.

AdamW (DT, the baselines) and Adam with L2 decay (CT, FM) built from `Optim`; the guard
that drops a bad batch's update whole (`update_ok`, `apply_if`, `skipped`); one gradient
step and its jitted, batch-checking wrapper; and the state and update of T stacked blocks
that each keep their own optimizer state.
"""

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from noprop_jax.core.checks import check_batch, to_float
from noprop_jax.core.settings import Optim
from noprop_jax.core.state import Metrics, State, new_rng, step_key

def adamw(optim: Optim) -> optax.GradientTransformation:
  """AdamW after clipping by the gradient norm of the tree it is applied to (NoProp-DT
  applies it per block with `jax.vmap`: each block clips by its own norm and keeps its
  own moments and step count; the baselines to the whole network)."""
  opt = optax.adamw(optim.lr, weight_decay=optim.weight_decay)
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt) if optim.grad_clip else opt


def _clip_per_group(max_norm: float) -> optax.GradientTransformation:
  """Clip each top-level group (block, head, embed, schedule) by its own norm, so a
  large denoising gradient does not shrink the head's or the schedule's step."""

  def update(updates, state, params=None):
    def clip(tree):
      norm = optax.global_norm(tree)
      return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30)), tree)

    return {k: clip(v) for k, v in updates.items()}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adam_l2(optim: Optim, no_decay: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (PyTorch's `Adam(weight_decay=...)`,
  the paper's CT/FM optimizer), after clipping each parameter group by its own norm.
  Groups in `no_decay` are not decayed."""
  mask = lambda params: {k: jax.tree.map(lambda _: k not in no_decay, v) for k, v in params.items()}
  parts = [_clip_per_group(optim.grad_clip)] if optim.grad_clip else []
  if optim.weight_decay:
    parts.append(optax.masked(optax.add_decayed_weights(optim.weight_decay), mask))
  return optax.chain(*parts, optax.scale_by_adam(), optax.scale(-optim.lr))


def all_finite(tree: Any) -> jax.Array:
  """Whether every float in `tree` is finite: a scalar bool."""
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
            if jnp.issubdtype(a.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def update_ok(loss: jax.Array, grads: Any, y: jax.Array, num_classes: int) -> jax.Array:
  """Whether a step may apply its update: a finite loss and gradients (`grads` may hold any
  other new values, e.g. BatchNorm statistics) and every label in [0, num_classes). A label
  out of range can give a finite loss towards a wrong target, so it is checked itself."""
  return all_finite((loss, grads)) & jnp.all((y >= 0) & (y < num_classes))


def apply_if(ok: jax.Array, update: Callable[[State], State], state: State) -> State:
  """`update(state)` where `ok`, else `state` bit for bit (a bad batch's update is dropped
  whole: parameters, optimizer state, statistics), with the step count advanced either way
  (the batch order and the noise follow it).

  On XLA:CPU a `lax.cond`: the update is computed only when it is applied, and the
  state's buffers stay in place, where a select would read and write the whole state once
  more every step (on a CPU as much as the optimizer update itself). Elsewhere a select
  of new against old, which XLA fuses into the update's own kernels: XLA's GPU runtime
  copies a conditional's predicate to the host and waits for it, so a `lax.cond` would
  keep the host from queueing the next step until this one's gradients are done.
  `lax.platform_dependent` picks the form when the step is lowered for its platform.
  """
  keep = lambda s: s
  select = lambda s: jax.tree.map(lambda new, old: jnp.where(ok, new, old), update(s), s)
  new = lax.platform_dependent(state, cpu=lambda s: lax.cond(ok, update, keep, s), default=select)
  return {**new, "step": state["step"] + 1}


def skipped(ok: jax.Array) -> jax.Array:
  """The metric `skipped`: 1.0 where the step did not apply its update, else 0.0."""
  return jnp.where(ok, 0.0, 1.0).astype(jnp.float32)


def gradient_step(loss_fn: Callable, opt: optax.GradientTransformation, state: State,
                  x: jax.Array, y: jax.Array, num_classes: int) -> tuple[State, jax.Array, Metrics]:
  """One optimizer step of `state['params']` on `loss_fn(params, state, x, y, key) ->
  (loss, (metrics, state updates))` (the updates replace entries of the state, e.g.
  BatchNorm statistics), applied only where `update_ok` (metrics['skipped'] says).
  Returns (new state, loss, metrics)."""
  (loss, (metrics, updates)), g = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], state, to_float(x), y, step_key(state))
  ok = update_ok(loss, (g, updates), y, num_classes)

  def update(state):
    upd, opt_state = opt.update(g, state["opt"], state["params"])
    return {**state, **updates, "params": optax.apply_updates(state["params"], upd),
            "opt": opt_state}

  return apply_if(ok, update, state), loss, {**metrics, "skipped": skipped(ok)}


def jit_step(train_step: Callable, model, *static) -> Callable:
  """`train_step(model, *static, state, x, y)` as `step(state, x, y) -> (state, metrics)`:
  `step` checks the batch (`check_batch`, values included: one small host sync per call)
  and runs `step.jitted`, the step jitted with `state` donated. Call `step.jitted` to skip
  the checks (and the sync) on batches already known to be good."""
  jitted = jax.jit(partial(train_step, model, *static), donate_argnums=0)

  def step(state: State, x: jax.Array, y: jax.Array) -> tuple[State, Metrics]:
    check_batch(model, x, y)  # before the call, which would donate (invalidate) `state`
    return jitted(state, x, y)

  step.jitted = jitted
  return step


def stacked_state(key: jax.Array, blocks: dict, shared: dict, opt: optax.GradientTransformation) -> State:
  """The state of T stacked blocks and the parameters they share: 'blocks' and 'opt_blocks'
  lead with the T axis (each block its own optimizer state), 'shared' and 'opt_shared' do not."""
  return {"step": jnp.zeros((), jnp.int32), "rng": new_rng(key), "blocks": blocks,
          "shared": shared, "opt_blocks": jax.vmap(opt.init)(blocks["params"]),
          "opt_shared": opt.init(shared)}


def stacked_update(opt: optax.GradientTransformation, state: State, g_blocks: dict,
                   g_shared: dict, block_updates: dict) -> State:
  """One optimizer step of a `stacked_state`: each block on its own gradient with its own
  optimizer state (vmapped: own clipping norm, moments and count), the shared parameters on
  theirs; `block_updates` (new BatchNorm statistics, stacked) replace the blocks' entries."""
  upd, opt_shared = opt.update(g_shared, state["opt_shared"], state["shared"])
  params = state["blocks"]["params"]
  upd_blocks, opt_blocks = jax.vmap(opt.update)(g_blocks, state["opt_blocks"], params)
  blocks = {**state["blocks"], **block_updates, "params": optax.apply_updates(params, upd_blocks)}
  return {**state, "blocks": blocks, "shared": optax.apply_updates(state["shared"], upd),
          "opt_blocks": opt_blocks, "opt_shared": opt_shared}
