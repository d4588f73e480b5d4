"""The back-propagation baseline (paper Eq. 17-19): NoProp-DT's T blocks chained as one
network and trained end to end on cross-entropy.

  z_0 ~ N(0, I),  z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t(z_{t-1}, x),
  u_hat_t = softmax(block_t(x, z_{t-1})) @ W_embed,  alpha_t = tanh(w_t) (learned),
  p(y | x) = softmax(W_out zT + b_out).

Unlike NoProp's, block t's gradient flows back through blocks t+1..T.
State: {'step', 'rng', 'params': {'blocks' (stacked on T), 'w' [T], 'head', 'embed'
(unless one-hot)}, 'stats' (the blocks' other collections, e.g. BatchNorm, stacked), 'opt'}.
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from noprop_jax import core
from noprop_jax.core import Compute, Metrics, Optim, State
from noprop_jax.method import Method, budgets
from noprop_jax.setting import setting

NAME = "Backprop baseline"
STACKED = ()
TIME_CONDITIONED = False  # blocks are (x, z) -> logits
W_INIT = 0.5  # alpha_t = tanh(0.5) = 0.46: every block starts with a real share of zT


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z) -> logits [B, num_classes], as for NoProp-DT
  input_shape: tuple[int, ...]  # one input's shape
  num_classes: int  # m
  T: int = setting(10, "number of chained blocks")
  embedding: str = setting("onehot", "class embedding: onehot | learned | prototype")
  embedding_dim: int = setting(0, "d; 0: m (onehot), the input size (prototype), 20 (learned)")
  remat: bool = setting(False, "recompute each block's activations in the backward pass "
                        "(jax.checkpoint per block): same step, more compute, less memory "
                        "(on XLA:CPU with --formulation scan)")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    if self.T < 1 or self.num_classes < 2:
      raise ValueError(f"need T >= 1 and num_classes >= 2, got {self.T}, {self.num_classes}")
    self.dim  # validates the embedding
    core.check_block(self.block, TIME_CONDITIONED, NAME)

  dim = property(core.model_dim)  # d, the embedding's dimension


def optimizer(optim: Optim):
  """AdamW after clipping by the global norm (paper Table 4): one network, one norm."""
  return core.adamw(optim)


@partial(jax.jit, static_argnames=("model", "optim"))  # eager flax init is ~10x slower
def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed: jax.Array | None = None) -> State:
  """T independently initialised blocks, w = W_INIT, the embedding, a readout head."""
  k_blocks, k_embed = jax.random.split(jax.random.fold_in(key, 0))
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z = jnp.zeros((1, model.dim), jnp.float32)
  variables = core.init_stacked(model.block, k_blocks, model.T, x, z)
  params = {"blocks": variables.pop("params"), "w": jnp.full((model.T,), W_INIT, jnp.float32)}
  W = core.init_embedding(model.embedding, k_embed, model.num_classes, model.dim, embed)
  if W is not None:
    params["embed"] = W
  params["head"] = core.readout_head(core.embedding_matrix(params, model.num_classes))
  return {"step": jnp.zeros((), jnp.int32), "rng": core.new_rng(key), "params": params,
          "stats": variables, "opt": optimizer(optim).init(params)}


def num_block_params(state: State) -> int:
  blocks = state["params"]["blocks"]
  return core.count_params(blocks) // core.num_stacked(blocks)


def forward(model: Model, compute: Compute, params: dict, stats: dict, x: jax.Array,
            z0: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """(class logits [B, m], updated stats) of the chained network (Eq. 17-19); training
  mode (dropout, batch statistics) when `key` is given."""
  W = core.embedding_matrix(params, model.num_classes)
  train = key is not None
  keys = jax.random.split(key, model.T) if train else jnp.arange(model.T)

  def step(z, inp):
    variables, alpha, k = inp
    logits, updates = core.apply(model.block, variables, x, z, train=train,
                                 rng=k if train else None)
    return core.chain_link(z, alpha, logits, W), updates

  if model.remat:  # the fair memory baseline: only each block's input z is kept for the backward
    step = jax.checkpoint(step)
  xs = ({**stats, "params": params["blocks"]}, jnp.tanh(params["w"]), keys)
  zT_BD, updates = core.fold_blocks(step, z0, xs, compute)
  return core.head_logits(params["head"], zT_BD), updates


def loss(model: Model, compute: Compute, params: dict, stats: dict, x: jax.Array,
         y: jax.Array, key: jax.Array):
  """Cross-entropy of the whole chain from z_0 ~ N(0, I). Returns (loss, (metrics, updated stats))."""
  core.check_batch(model, x, y)
  x = core.to_float(x)
  k0, k_drop = jax.random.split(key)
  z0 = jax.random.normal(k0, (x.shape[0], model.dim))
  logits, updates = forward(model, compute, params, stats, x, z0, k_drop)
  ce = core.cross_entropy(logits, y)
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return ce, ({"ce": ce, "accuracy": acc, "block_accuracy": acc}, updates)


def train_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
               y: jax.Array) -> tuple[State, Metrics]:
  """One AdamW step of the whole network on one batch (dropped whole, BatchNorm statistics
  included, where `core.update_ok` fails: metrics['skipped'])."""
  core.check_batch(model, x, y)

  def objective(params, state, x, y, key):
    value, (metrics, stats) = loss(model, compute, params, state["stats"], x, y, key)
    return value, (metrics, {"stats": {**state["stats"], **stats}})

  state, value, m = core.gradient_step(objective, optimizer(optim), state, x, y,
                                        model.num_classes)
  return state, {"loss": value, "alpha": jnp.tanh(state["params"]["w"]), **m}


def make_train_step(model: Model, optim: Optim = Optim(), compute: Compute = Compute()):
  """`step(state, x, y) -> (state, metrics)`: checks the batch (shapes, dtypes and values:
  one small host sync per call) and runs `step.jitted`, the jitted `train_step` that donates
  `state`. Call `step.jitted` to skip the checks and the sync."""
  return core.jit_step(train_step, model, optim, compute.resolve(model.T))


def predict(model: Model, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str = "mean", compute: Compute | None = None) -> jax.Array:
  """Class logits [B, m]. mode 'mean': z_0 = 0; 'stochastic': z_0 ~ N(0, I), needs `key`
  (the network's only randomness at inference)."""
  core.check_predict(model, x, mode, key)
  return _predict(model, (compute or Compute()).resolve(model.T), state, x, key, mode)


@partial(jax.jit, static_argnames=("model", "compute", "mode"))
def _predict(model, compute, state, x, key, mode):
  z0 = core.inference_noise(mode, (x.shape[0], model.dim), key)
  return forward(model, compute, state["params"], state["stats"], core.to_float(x), z0)[0]


def eval_counts(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array,
                key: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with z_0 = 0, [runs] correct with z_0 ~ N(0, I)) on one batch."""
  core.check_batch(model, x, y, padding=True)
  solve = lambda x, z0: forward(model, compute, state["params"], state["stats"], x, z0)[0]
  return core.eval_paths(solve, lambda logits: logits, core.to_float(x), y, key, runs, model.dim)


def block_calls(model: Model) -> int:
  """Block calls to classify one batch: each block once."""
  return model.T


def describe(model: Model, compute: Compute, state: State) -> str:
  return f"T={model.T} chained blocks of {num_block_params(state):,} parameters, trained end to end"


METHOD = Method(
    name="backprop", title=NAME, Model=Model, init=init, train_step=train_step,
    eval_counts=eval_counts, predict=predict, num_block_params=num_block_params,
    block_calls=block_calls, describe=describe, time_conditioned=TIME_CONDITIONED,
    epochs=budgets(digits=12, mnist=100, cifar10=150, cifar100=150),
    metrics=("ce", "accuracy", "block_accuracy", "alpha"), resumable=("remat",))
