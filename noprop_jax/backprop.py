"""The back-propagation baseline (paper Eq. 17-19) as pure functions.

The same T blocks and head as NoProp-DT, chained as an ordinary network:
  z_0 ~ N(0, I),  z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t(z_{t-1}, x),
  u_hat_t = softmax(block_t(x, z_{t-1})) @ W_embed,  alpha_t = tanh(w_t) (learned),
  p(y | x) = softmax(W_out z_T + b_out),
trained end to end on cross-entropy with AdamW: the gradient of block t
flows back through blocks t+1..T, unlike NoProp's.

State is a plain pytree:
  step         int32 scalar
  params       {'blocks' (stacked on T), 'w' [T], 'head', 'embed' (learned/prototype)}
  batch_stats  BatchNorm statistics, stacked on T
  opt          optimizer state of `params`
"""

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from noprop_jax import dt
from noprop_jax.config import Config
from noprop_jax.models import DTBlock, count_params

State = dict[str, Any]
Metrics = dict[str, jax.Array]

W_INIT = 0.5  # alpha_t = tanh(0.5) = 0.46: every block starts with a real share of z_T


# AdamW after clipping by the global norm (paper Table 4): NoProp-DT's optimizer, here
# applied to the whole network at once, so one network has one norm.
optimizer = dt.optimizer


@partial(jax.jit, static_argnums=0)  # eager, flax init dispatches op by op: ~10x slower
def init(cfg: Config, key: jax.Array, embed: jax.Array | None = None) -> State:
  """T independently initialised blocks, w = W_INIT, embedding, `init_head`, optimizer.

  `embed`: the initial prototype embedding [m, H*W*C] (embedding 'prototype' only).
  """
  k_blocks, k_embed = jax.random.split(key)
  model = dt.make_model(cfg)
  x = jnp.zeros((1, *cfg.image_shape), jnp.float32)
  z = jnp.zeros((1, cfg.embedding_dim), jnp.float32)
  variables = jax.vmap(lambda k: model.init({"params": k}, x, z, train=False))(
      jax.random.split(k_blocks, cfg.T))
  params = {"blocks": variables["params"], "w": jnp.full((cfg.T,), W_INIT, jnp.float32)}
  W = dt.initial_embedding(cfg, k_embed, embed)
  if W is not None:
    params["embed"] = W
  params["head"] = init_head(dt.embedding_matrix(params, cfg))
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "batch_stats": variables["batch_stats"], "opt": optimizer(cfg).init(params)}


HEAD_SCALE = 10.0


def init_head(W_MD: jax.Array) -> dict:
  """A head that starts as a nearest-embedding readout, logits_c = 10 <u_c, z> / mean ||u||^2.

  Unlike NoProp's, this head is trained only through the network's own z_T, whose
  entries stay within the embeddings' range (a convex mix for one-hot). From zero no
  gradient reaches the blocks; from a LeCun-normal init AdamW at 1e-3 needs thousands
  of steps to grow logits that separate classes (87.6% after one MNIST epoch); from
  this init the blocks get a useful gradient at once.
  """
  scale = HEAD_SCALE / jnp.mean(jnp.sum(W_MD**2, axis=-1))
  return {"kernel": scale * W_MD.T, "bias": jnp.zeros((W_MD.shape[0],), jnp.float32)}


def params_per_block(state: State) -> int:
  blocks = state["params"]["blocks"]
  return count_params(blocks) // jax.tree.leaves(blocks)[0].shape[0]


def head_logits(params, z: jax.Array) -> jax.Array:
  """The linear classifier W_out z + b_out."""
  return z @ params["head"]["kernel"] + params["head"]["bias"][None, :]


def _chain(cfg: Config, step: Callable, z0: jax.Array, xs) -> tuple[jax.Array, Any]:
  """Fold `step(z, x_t) -> (z, out_t)` over the T stacked blocks, in order.

  Unrolled on XLA:CPU (conv weight gradients inside loops are slow there,
  DESIGN.md section 10), `lax.scan` elsewhere (one block's code, compiled once).
  """
  if jax.default_backend() != "cpu":
    return lax.scan(step, z0, xs)
  outs, z = [], z0
  for i in range(cfg.T):
    z, out = step(z, jax.tree.map(lambda a: a[i], xs))
    outs.append(out)
  return z, jax.tree.map(lambda *o: jnp.stack(o), *outs)


def forward(cfg: Config, params, batch_stats, x: jax.Array, z0: jax.Array, train: bool,
            key: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """(class logits [B, m], new batch_stats) of the chained network (Eq. 17-19)."""
  model = dt.make_model(cfg)
  W = dt.embedding_matrix(params, cfg)
  alpha = jnp.tanh(params["w"])
  keys = (jax.random.split(key, cfg.T) if train else jnp.zeros((cfg.T,), jnp.uint32))

  def step(z, inp):
    p, s, a, k = inp
    if train:
      logits, mut = model.apply({"params": p, "batch_stats": s}, x, z, train=True,
                                rngs={"dropout": k}, mutable=["batch_stats"])
      s = mut["batch_stats"]
    else:
      logits = model.apply({"params": p, "batch_stats": s}, x, z, train=False)
    return (1.0 - a) * z + a * (jax.nn.softmax(logits) @ W), s

  z_T, new_stats = _chain(cfg, step, z0, (params["blocks"], batch_stats, alpha, keys))
  return head_logits(params, z_T), new_stats


def loss_fn(cfg: Config, params, batch_stats, x, y, key):
  """Cross-entropy of the whole chain from z_0 ~ N(0, I). Returns (loss, (stats, metrics))."""
  k0, k_drop = jax.random.split(key)
  z0 = jax.random.normal(k0, (x.shape[0], cfg.embedding_dim))
  logits, new_stats = forward(cfg, params, batch_stats, x, z0, True, k_drop)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return ce, (new_stats, {"ce": ce, "accuracy": acc, "block_accuracy": acc})


def train_step(cfg: Config, state: State, x: jax.Array, y: jax.Array) -> tuple[State, Metrics]:
  """One AdamW step of the whole network on one batch."""
  x = dt.to_float(x)
  (loss, (stats, m)), g = jax.value_and_grad(partial(loss_fn, cfg), has_aux=True)(
      state["params"], state["batch_stats"], x, y, dt.step_key(cfg, state["step"]))
  upd, opt = optimizer(cfg).update(g, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], upd)
  new_state = {"step": state["step"] + 1, "params": params, "batch_stats": stats, "opt": opt}
  return new_state, {"loss": loss, "alpha": jnp.tanh(params["w"]), **m}


def make_train_step(cfg: Config) -> Callable[[State, jax.Array, jax.Array], tuple[State, Metrics]]:
  """Jitted `(state, x, y) -> (state, metrics)`; donates `state`."""
  return jax.jit(partial(train_step, cfg), donate_argnums=0)


def initial_z(cfg: Config, batch: int, key: jax.Array | None, mode: str | None) -> jax.Array:
  """z_0 for inference: 0 for mode 'mean' (cfg.inference by default), N(0, I) for
  'stochastic' (needs `key`)."""
  mode = mode or cfg.inference
  shape = (batch, cfg.embedding_dim)
  if mode == "mean":
    return jnp.zeros(shape)
  if mode == "stochastic":
    if key is None:
      raise ValueError("stochastic inference needs a PRNG key")
    return jax.random.normal(key, shape)
  raise ValueError(f"unknown inference mode {mode!r}; choose 'mean' or 'stochastic'")


@partial(jax.jit, static_argnames=("cfg", "mode"))
def predict(cfg: Config, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str | None = None) -> jax.Array:
  """Class logits for images x. mode 'mean' (default): z_0 = 0; 'stochastic':
  z_0 ~ N(0, I), needs `key` (the network's only randomness at inference)."""
  dt.check_images(x, cfg)
  z0 = initial_z(cfg, x.shape[0], key, mode)
  return forward(cfg, state["params"], state["batch_stats"], dt.to_float(x), z0, False)[0]


def eval_counts(cfg: Config, state: State, x: jax.Array, y: jax.Array, key: jax.Array,
                runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with z_0 = 0, [runs] correct with z_0 ~ N(0, I)) on one batch; all runs
  go through the network together as one [(1 + runs) * B] batch. Labels -1 never count."""
  B = y.shape[0]
  x = dt.to_float(x)
  z0 = jnp.concatenate([jnp.zeros((B, cfg.embedding_dim)),
                        jax.random.normal(key, (runs * B, cfg.embedding_dim))])
  xs = jnp.broadcast_to(x[None], (1 + runs, *x.shape)).reshape(-1, *x.shape[1:])
  logits, _ = forward(cfg, state["params"], state["batch_stats"], xs, z0, False)
  correct = (jnp.argmax(logits, -1).reshape(1 + runs, B) == y[None, :]).sum(-1)
  return correct[0], correct[1:]
