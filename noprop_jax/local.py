"""Greedy block-wise local learning: the backprop baseline's chain of T blocks, each block
trained on its own classifier's cross-entropy, with no gradient between blocks.

  model = local.Model(block, input_shape=(64,), num_classes=10)   # any (x, z) -> logits block
  state = local.init(model, jax.random.key(0))
  step = local.make_train_step(model)
  state, metrics = step(state, x, y)
  logits = local.predict(model, state, x_test)                    # the last block's classifier

Block t gets the *detached* z_{t-1} (greedy learning with local losses):

  z_t = (1 - alpha_t) z_{t-1} + alpha_t softmax(block_t(x, sg(z_{t-1}))),
  loss_t = CE(head_t(z_t), y),   alpha_t = tanh(w_t),

the chain of the backprop baseline with z in class space (one-hot embedding): a learned
embedding shared by all blocks would couple them. This trains NoProp's own chain greedily,
each block reading the input x and a class-space z; it is not Decoupled Greedy Learning as
published, where each module reads the previous module's (detached) feature maps, so its
numbers are not DGL's. Block t, its w_t and its linear head_t
are trained on loss_t alone by their own AdamW (own clipping norm, moments, count).
The objective (`loss`) is the plain sum of the blocks' `block_loss` terms along the chain
from `chain_start`; the training step differentiates the same `block_loss`, block by
block, on the same chain.
Each block's gradient is taken as soon as its output is known, inside the chain, so a
step holds one block's activations at a time, as NoProp's scan formulation does, not
the whole chain's, as backprop must.

State: {'step', 'rng', 'params': {'blocks', 'w' [T], 'head': {'kernel' [T, m, m],
'bias' [T, m]}} (every leaf leads with T), 'stats' (the blocks' other collections, e.g.
BatchNorm, stacked), 'opt' (each block's own, stacked)}.
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from noprop_jax import core
from noprop_jax.core import Compute, Metrics, Optim, State
from noprop_jax.method import Method, budgets
from noprop_jax.setting import setting

NAME = "Greedy local learning"
STACKED = ()  # the chain runs its blocks in order: no 'blocks' mesh axis, no blocks_per_step
TIME_CONDITIONED = False  # blocks are (x, z) -> logits
W_INIT = 0.5  # alpha_t = tanh(0.5) = 0.46, as the backprop baseline
# A step folds its blocks in a lax.scan unless told otherwise: each iteration's activations
# are freed before the next starts, the memory saving that is local learning's point. An
# unrolled chain leaves the order to XLA's scheduler, which on XLA:CPU keeps more alive.
AUTO_FORMULATION = "scan"


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z) -> logits [B, num_classes], as for NoProp-DT
  input_shape: tuple[int, ...]  # one input's shape
  num_classes: int  # m (z's dimension)
  T: int = setting(10, "number of chained blocks")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    if self.T < 1 or self.num_classes < 2:
      raise ValueError(f"need T >= 1 and num_classes >= 2, got {self.T}, {self.num_classes}")
    core.check_block(self.block, TIME_CONDITIONED, NAME)

  @property
  def dim(self) -> int:
    return self.num_classes


def optimizer(optim: Optim):
  """One AdamW per block (applied with vmap over the T axis), clipped by its own norm."""
  return core.adamw(optim)


@partial(jax.jit, static_argnames=("model", "optim"))  # eager flax init is ~10x slower
def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed: jax.Array | None = None) -> State:
  """T independently initialised blocks, w = W_INIT, and readout heads (each block's
  classifier starts as a nearest-class readout of its z, as the backprop baseline's)."""
  if embed is not None:
    raise ValueError(f"{NAME} has no class embedding to initialise (z is in class space)")
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z = jnp.zeros((1, model.dim), jnp.float32)
  variables = core.init_stacked(model.block, jax.random.fold_in(key, 0), model.T, x, z)
  head = core.readout_head(jnp.eye(model.num_classes, dtype=jnp.float32))
  params = {"blocks": variables.pop("params"), "w": jnp.full((model.T,), W_INIT, jnp.float32),
            "head": jax.tree.map(lambda a: jnp.stack([a] * model.T), head)}
  return {"step": jnp.zeros((), jnp.int32), "rng": core.new_rng(key), "params": params,
          "stats": variables, "opt": jax.vmap(optimizer(optim).init)(params)}


def num_block_params(state: State) -> int:
  """Parameters of one block (its network; w_t and head_t not counted)."""
  blocks = state["params"]["blocks"]
  return core.count_params(blocks) // core.num_stacked(blocks)


# ----------------------------------------------------------------------------- the objective

def link(model: Model, p: dict, stats: dict, x: jax.Array, zprev_BD: jax.Array,
         key: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """(z_t [B, d], updated stats) from the detached z_{t-1} (`zprev_BD`), by block t's
  parameters `p` ({'blocks', 'w', 'head'}) and other collections `stats`: training mode
  (dropout, batch statistics) when `key` is given."""
  zprev_BD = jax.lax.stop_gradient(zprev_BD)
  logits_BM, updates = core.apply(model.block, {**stats, "params": p["blocks"]}, x, zprev_BD,
                                  train=key is not None, rng=key)
  return core.chain_link(zprev_BD, jnp.tanh(p["w"]), logits_BM,
                         jnp.eye(model.num_classes)), updates


def chain_start(model: Model, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(z0 ~ N(0, I) [B, d] (d = m: z is in class space), the blocks' key) of a batch's
  chain, from its key."""
  k0, k_blocks = jax.random.split(key)
  return jax.random.normal(k0, (x.shape[0], model.dim)), k_blocks


def block_loss(model: Model, p: dict, stats: dict, x: jax.Array, zprev_BD: jax.Array,
               y: jax.Array, t, key: jax.Array):
  """Block t's own objective (t: 0-based, may be traced), CE(head_t(z_t), y), in training
  mode, drawn from fold_in(key, t) (`key`: the blocks' key of `chain_start`). `loss` sums it
  over the chain; the training step differentiates it block by block, in `p`. Returns
  (ce, (z_t, updated stats, head_t's accuracy))."""
  z_BD, updates = link(model, p, stats, x, zprev_BD, jax.random.fold_in(key, t))
  logits_BM = core.head_logits(p["head"], z_BD)
  return core.cross_entropy(logits_BM, y), (z_BD, updates,
                                            jnp.mean(jnp.argmax(logits_BM, -1) == y))


def loss(model: Model, params: dict, stats: dict, x: jax.Array, y: jax.Array,
         key: jax.Array) -> tuple[jax.Array, Metrics]:
  """The sum of the blocks' own objectives along the chain from z0 ~ N(0, I):

    L = sum_{t=1..T} CE(head_t(z_t), y),
    z_t = (1 - alpha_t) z_{t-1} + alpha_t softmax(block_t(x, sg(z_{t-1}))).

  Each term depends on its own block's parameters only (z_{t-1} enters detached), so this
  sum's gradient is every block's local gradient at once. The training step applies it
  (key = `core.step_key(state)`): `gradients` differentiates the same `block_loss`, block
  by block on the same chain, which needs one block's activations at a time (tests check
  that the two agree)."""
  core.check_batch(model, x, y)
  x = core.to_float(x)

  # 1. THE CHAIN'S START: z0 ~ N(0, I), and the key each block's draws are folded from.
  z_BD, k_blocks = chain_start(model, x, key)

  # 2. EACH BLOCK'S TERM, in order: CE(head_t(z_t), y), z_t from the detached z_{t-1}.
  ce_T = []
  for t in range(model.T):
    ce, (z_BD, _, _) = block_loss(model, core.take(params, t), core.take(stats, t), x, z_BD, y,
                                  t, k_blocks)
    ce_T.append(ce)
  ce_T = jnp.stack(ce_T)

  # 3. THEIR SUM, every block's term weighted alike.
  return jnp.sum(ce_T), {"block_loss": ce_T}


# ----------------------------------------------------------------------------- training

def gradients(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array):
  """`loss`'s gradient with the step's key (`core.step_key(state)`): every block's
  `block_loss` differentiated in its own parameters, in the chain's order, from the same
  `chain_start`. Returns (gradients, stacked like params; aux: 'block_loss' [T],
  'block_accuracy' [T], 'stats' (updated, stacked)). Block t's forward and backward pass
  both finish before block t + 1 starts; only the detached z_t is carried."""
  x = core.to_float(x)
  z0_BD, k_blocks = chain_start(model, x, core.step_key(state))
  grad = jax.value_and_grad(partial(block_loss, model), has_aux=True)

  def step(zprev_BD, inp):
    p, stats, t = inp
    (ce, (z_BD, updates, acc)), g = grad(p, stats, x, zprev_BD, y, t, k_blocks)
    return jax.lax.stop_gradient(z_BD), (g, ce, acc, updates)

  xs = (state["params"], state["stats"], jnp.arange(model.T))
  _, (g, ce_T, acc_T, updates) = core.fold_blocks(step, z0_BD, xs, compute)
  return g, {"block_loss": ce_T, "block_accuracy": acc_T,
             "stats": {**state["stats"], **updates}}


def train_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
               y: jax.Array) -> tuple[State, Metrics]:
  """One step of every block on its own objective, each by its own AdamW (dropped whole,
  statistics included, where `core.update_ok` fails: metrics['skipped'])."""
  core.check_batch(model, x, y)
  g, aux = gradients(model, compute, state, x, y)
  value = aux["block_loss"].sum()
  ok = core.update_ok(value, (g, aux["stats"]), y, model.num_classes)

  def update(state):
    upd, opt = jax.vmap(optimizer(optim).update)(g, state["opt"], state["params"])
    return {**state, "params": optax.apply_updates(state["params"], upd), "opt": opt,
            "stats": aux["stats"]}

  return core.apply_if(ok, update, state), {
      "loss": value, "block_loss": aux["block_loss"], "block_accuracy": aux["block_accuracy"],
      "alpha": jnp.tanh(state["params"]["w"]), "skipped": core.skipped(ok)}


def make_train_step(model: Model, optim: Optim = Optim(), compute: Compute = Compute()):
  """`step(state, x, y) -> (state, metrics)`: checks the batch (shapes, dtypes and values:
  one small host sync per call) and runs `step.jitted`, the jitted `train_step` that donates
  `state`. Call `step.jitted` to skip the checks and the sync."""
  return core.jit_step(train_step, model, optim, compute.resolve(model.T, auto=AUTO_FORMULATION))


# ----------------------------------------------------------------------------- inference

def forward(model: Model, compute: Compute, state: State, x: jax.Array, z0: jax.Array) -> jax.Array:
  """The last block's classifier on the chain run from z0 (inference mode): [B, m]."""

  step = lambda z, inp: (link(model, *inp[:2], x, z)[0], None)

  zT_BD = core.fold_blocks(step, z0, (state["params"], state["stats"]), compute)[0]
  return core.head_logits(core.take(state["params"]["head"], model.T - 1), zT_BD)


def predict(model: Model, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str = "mean", compute: Compute | None = None) -> jax.Array:
  """Class logits [B, m]. mode 'mean': z0 = 0; 'stochastic': z0 ~ N(0, I), needs `key`."""
  core.check_predict(model, x, mode, key)
  compute = (compute or Compute()).resolve(model.T, auto=AUTO_FORMULATION)
  return _predict(model, compute, state, x, key, mode)


@partial(jax.jit, static_argnames=("model", "compute", "mode"))
def _predict(model, compute, state, x, key, mode):
  z0_BD = core.inference_noise(mode, (x.shape[0], model.dim), key)
  return forward(model, compute, state, core.to_float(x), z0_BD)


def eval_counts(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array,
                key: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with z0 = 0, [runs] correct with z0 ~ N(0, I)) on one batch."""
  core.check_batch(model, x, y, padding=True)
  solve = lambda x, z0: forward(model, compute, state, x, z0)
  return core.eval_paths(solve, lambda logits: logits, core.to_float(x), y, key, runs, model.dim)


def block_calls(model: Model) -> int:
  """Block calls to classify one batch: each block once."""
  return model.T


def describe(model: Model, compute: Compute, state: State) -> str:
  return (f"T={model.T} chained blocks of {num_block_params(state):,} parameters, each trained "
          f"on its own classifier (no gradient between blocks)")


METHOD = Method(
    name="local", title=NAME, Model=Model, init=init, train_step=train_step,
    eval_counts=eval_counts, predict=predict, num_block_params=num_block_params,
    block_calls=block_calls, describe=describe, time_conditioned=TIME_CONDITIONED,
    epochs=budgets(digits=12, mnist=100, cifar10=150, cifar100=150),
    metrics=("block_loss", "block_accuracy", "alpha"), auto_formulation=AUTO_FORMULATION)
