"""The jitted programs a training run is made of, built from its settings: the method's
model and initial state, the batch order, the epoch step and the evaluator.

Each program is built once per setting in a process (`_once_per_setting`): another run
with the same settings (another seed, a resumed run, a notebook's next call) reuses the
program already traced and compiled.
"""

import contextlib
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from noprop_jax import blocks, core, sharding
from noprop_jax.config import RunConfig
from noprop_jax.prototypes import prototype_embedding


def build_model(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int,
                compute: core.Compute, backend: str | None = None):
  """The method's Model for data of this shape, with the configured block. `compute` is
  resolved; with `backend` (default: JAX's) it picks the paper block's convolution."""
  method = cfg.method_record
  vmapped = method.side_by_side and core.vmaps_blocks(compute.formulation, compute.blocks_per_step)
  # The block's output size: the classes' logits, or another size the method asks for.
  out = method.block_outputs(cfg.model, num_classes) if method.block_outputs else num_classes
  block = blocks.make(cfg.block, method.time_conditioned, out, tuple(input_shape),
                      prototype=cfg.model.get("embedding") == "prototype", vmapped=vmapped,
                      backend=backend)
  return method.Model(block, tuple(input_shape), num_classes, **cfg.model)


def resolve_compute(cfg: RunConfig, backend: str | None = None) -> core.Compute:
  """cfg's execution settings resolved for `backend` (default: JAX's)."""
  return cfg.train.compute.resolve(cfg.T, cfg.train.mesh_shape["blocks"],
                                   cfg.method_record.auto_formulation, backend)


def init_state(cfg: RunConfig, model, key: jax.Array, inputs=None, labels=None):
  """The method's initial state; prototype embeddings come from the training split
  (without it, zeros: a template for restoring a checkpoint)."""
  embed = None
  if cfg.model.get("embedding") == "prototype":
    embed = (jnp.zeros((model.num_classes, model.dim), jnp.float32) if inputs is None
             else prototype_embedding(inputs, labels, model.num_classes))
  return cfg.method_record.init(model, key, cfg.train.optim, embed=embed)


@functools.partial(jax.jit, static_argnums=(2, 3))
def batch_order(rng: jax.Array, step: jax.Array, n_train: int, per_pass: int) -> jax.Array:
  """The order [n_train] in which pass p = step // per_pass visits the training split: a
  permutation keyed on (the run's key `rng`, p), so a run resumed at any step sees exactly
  the batches it would have seen. Computed once per pass; each step slices its batch."""
  p = step // per_pass
  return jax.random.permutation(jax.random.fold_in(core.stream({"rng": rng}, 2), p), n_train)


def make_epoch_step(cfg: RunConfig, model, compute: core.Compute, n_train: int) -> Callable:
  """Jitted `(state, inputs, labels, order) -> (state, metrics)` on the whole training split.

  The batch is cut on the device: step i of a pass takes the i-th batch of `order`, the
  pass's `batch_order`. Sequential training (Algorithm 1) updates block p % T during
  pass p. With a mesh, the batch is split on 'data' and the method's stacked state on
  'blocks'.

  One per setting in a process: another run with the same settings (another seed, a
  resumed run, a notebook's next call) reuses the step already traced and compiled.
  """
  tr, method = cfg.train, cfg.method_record
  # The method's step functions are part of the key: one replaced (a method registered
  # again, a user's experiment) gets a step of its own.
  steps = (method.train_step, method.sequential_step)
  return _once_per_setting(_epoch_step, method.stacked, steps, tr.batch_size, tr.optim,
                           tr.mesh, tr.training, cfg.T, model, compute, n_train)


def _once_per_setting(build: Callable, *settings) -> Callable:
  """`build(*settings)`, cached on the settings; built anew where they cannot be hashed
  (a user's block with, say, a list attribute)."""
  try:
    hash(settings)
  except TypeError:
    return build.__wrapped__(*settings)
  return build(*settings)


@functools.lru_cache(maxsize=16)
def _epoch_step(stacked: tuple[str, ...], steps: tuple[Callable, Callable | None], B: int,
                optim: core.Optim, mesh_spec: str, training: str, T: int, model,
                compute: core.Compute, n_train: int) -> Callable:
  """`make_epoch_step` from the settings it reads, all hashable: the cache's key."""
  (train_step, sequential_step), per_pass = steps, n_train // B
  mesh = sharding.make_mesh(mesh_spec)

  def step(state, inputs, labels, order):
    with _mesh_context(mesh):
      return _step(state, inputs, labels, order)

  def _step(state, inputs, labels, order):
    p, i = jnp.divmod(state["step"], per_pass)
    idx = lax.dynamic_slice_in_dim(order, i * B, B)
    x, y = inputs[idx], labels[idx]
    if mesh is not None:
      x, y = sharding.constrain((x, y), sharding.batch_sharding(mesh))
    if training == "sequential":
      state, m = sequential_step(model, optim, compute, state, x, y, p % T)
    else:
      state, m = train_step(model, optim, compute, state, x, y)
    if mesh is not None:
      state = sharding.constrain(state, sharding.state_shardings(stacked, mesh, state))
      # The few metric values on every device: each host reads them (to log, to check the
      # loss), and a host can only read what its own devices hold.
      m = sharding.constrain(m, sharding.replicated(mesh))
    return state, m

  return jax.jit(step, donate_argnums=0)


def _mesh_context(mesh):
  """The mesh as JAX's context while a step is traced: the parts that split the work by
  hand (`sharding.over_blocks`, `sharding.per_example`) read it there."""
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


EVAL_BATCH = 500  # evaluation's largest batch; smaller where it does not fit in memory


def make_evaluator(cfg: RunConfig, model, compute: core.Compute, n: int, runs: int,
                   batch: int = EVAL_BATCH) -> Callable:
  """Jitted `(state, inputs, labels, key) -> (mean-path accuracy, [runs] sampled accuracies)`
  over a whole split: `lax.map` over fixed-size batches of the method's `eval_counts`.
  One per setting in a process, as `make_epoch_step`."""
  return _once_per_setting(_evaluator, cfg.method_record.eval_counts, cfg.train.mesh, model,
                           compute, n, runs, min(batch, n))


@functools.lru_cache(maxsize=16)
def _evaluator(counts: Callable, mesh_spec: str, model, compute: core.Compute, n: int, runs: int,
               batch: int) -> Callable:
  nb = math.ceil(n / batch)
  mesh = sharding.make_mesh(mesh_spec)

  def evaluate(state, inputs, labels, key):
    with _mesh_context(mesh):
      return _evaluate(state, inputs, labels, key)

  def _evaluate(state, inputs, labels, key):
    pad = nb * batch - n
    xs = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1)).reshape(nb, batch, *inputs.shape[1:])
    ys = jnp.pad(labels, (0, pad), constant_values=-1).reshape(nb, batch)
    def one(a):
      if mesh is not None and batch % mesh.shape["data"] == 0:  # each device its rows
        a = (*sharding.constrain(a[:2], sharding.batch_sharding(mesh)), a[2])
      return counts(model, compute, state, *a, runs)

    c_mean, c_stoch = lax.map(one, (xs, ys, jax.random.split(key, nb)))
    out = c_mean.sum() / n, c_stoch.sum(0) / n
    # On every device, so that every host can read them (as the step's metrics).
    return out if mesh is None else sharding.constrain(out, sharding.replicated(mesh))

  return jax.jit(evaluate)
