"""NoProp-DT as pure functions: init, losses, training steps, inference.

State is a plain pytree (dict):
  step        int32 scalar, number of optimizer steps taken
  blocks      {'params', 'batch_stats'}, every leaf stacked on a leading T axis
  shared      {'head': {'kernel' [d, m], 'bias' [m]}, 'embed' [m, d] if learned}
  opt_blocks  optimizer state of the blocks, stacked on T (per-block Adam moments,
              per-block step counts)
  opt_shared  optimizer state of `shared`

Block t (index i = t - 1 here) sees only z_{t-1} ~ q(z_{t-1} | y) and its own
loss term; nothing couples blocks but the shared head and embedding.
"""

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from noprop_jax.config import Config
from noprop_jax.models import DTBlock, count_params, init_embedding
from noprop_jax.schedule import DTSchedule, dt_schedule

State = dict[str, Any]
Metrics = dict[str, jax.Array]


def make_model(cfg: Config) -> DTBlock:
  proto = cfg.image_shape if cfg.embedding == "prototype" else None
  return DTBlock(cfg.num_classes, cfg.info.padding, cfg.dropout, cfg.resolved_conv_impl(),
                 prototype_shape=proto)


def schedule(cfg: Config) -> DTSchedule:
  return dt_schedule(cfg.T, cfg.eta, cfg.alpha_bar_min, cfg.alpha_bar_max)


def optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW (paper Table 4), after clipping by the gradient norm of *this* tree.

  Applied per block with `jax.vmap`, so each block clips by its own norm and
  keeps its own moments and step count.
  """
  adamw = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw


def embedding_matrix(shared: dict, cfg: Config) -> jax.Array:
  """W_embed [m, d]: the fixed identity for one-hot, else the learned matrix."""
  if cfg.embedding == "onehot":
    return jnp.eye(cfg.num_classes, dtype=jnp.float32)
  return shared["embed"]


def initial_embedding(cfg: Config, key: jax.Array, embed: jax.Array | None) -> jax.Array | None:
  """The learned W_embed's initial value: None for one-hot (fixed identity), an orthogonal
  matrix for 'learned', and `embed` (from `prototypes.prototype_embedding`) for 'prototype'."""
  m, d = cfg.num_classes, cfg.embedding_dim
  if cfg.embedding == "onehot":
    return None
  if cfg.embedding == "learned":
    return init_embedding(key, m, d)
  if embed is None:
    raise ValueError("a prototype embedding is initialised from the training images: pass "
                     "embed=prototypes.prototype_embedding(images, labels, num_classes)")
  if tuple(embed.shape) != (m, d):
    raise ValueError(f"prototype embedding must have shape ({m}, {d}), got {tuple(embed.shape)}")
  return jnp.asarray(embed, jnp.float32)


@partial(jax.jit, static_argnums=0)  # eager, flax init dispatches op by op: ~10x slower
def init(cfg: Config, key: jax.Array, embed: jax.Array | None = None) -> State:
  """All T blocks initialised independently (vmap of init), head, embedding, optimizers.

  `embed`: the initial prototype embedding [m, H*W*C] (embedding 'prototype' only).
  """
  k_blocks, k_head, k_embed = jax.random.split(key, 3)
  model = make_model(cfg)
  x = jnp.zeros((1, *cfg.image_shape), jnp.float32)
  z = jnp.zeros((1, cfg.embedding_dim), jnp.float32)
  init_one = lambda k: model.init({"params": k}, x, z, train=False)
  variables = jax.vmap(init_one)(jax.random.split(k_blocks, cfg.T))
  blocks = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  d, m = cfg.embedding_dim, cfg.num_classes
  # Zero head: softmax regression on z_T is convex, and from zero Adam's first step
  # already makes it diagonal-dominant; a random init needs thousands of steps to undo.
  shared = {"head": {"kernel": jnp.zeros((d, m), jnp.float32),
                     "bias": jnp.zeros((m,), jnp.float32)}}
  W = initial_embedding(cfg, k_embed, embed)
  if W is not None:
    shared["embed"] = W
  opt = optimizer(cfg)
  return {"step": jnp.zeros((), jnp.int32), "blocks": blocks, "shared": shared,
          "opt_blocks": jax.vmap(opt.init)(blocks["params"]), "opt_shared": opt.init(shared)}


def params_per_block(state: State) -> int:
  """Parameters of one block (works on `jax.eval_shape` output too)."""
  params = state["blocks"]["params"]
  return count_params(params) // jax.tree.leaves(params)[0].shape[0]


def check_images(x: jax.Array, cfg: Config) -> None:
  if x.ndim != 4 or tuple(x.shape[1:]) != cfg.image_shape:
    raise ValueError(f"images must have shape [batch, {', '.join(map(str, cfg.image_shape))}] "
                     f"for dataset {cfg.dataset!r}, got {tuple(x.shape)}")


def to_float(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def compute_dtype(cfg: Config):
  return jnp.bfloat16 if cfg.precision == "bfloat16" else jnp.float32


def apply_train(cfg: Config, model, params, batch_stats, *inputs, rng: jax.Array):
  """`model.apply` in training mode at cfg.precision: with 'bfloat16' the float32
  parameters and float inputs are cast to bf16 for the computation (the casts'
  gradients return float32 to the parameters, so the optimizer state stays
  float32); BatchNorm statistics stay float32. Returns (float32 logits, new batch_stats)."""
  dtype = compute_dtype(cfg)
  cast = lambda t: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
  variables = {"params": cast(params)}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  logits, mutated = model.apply(variables, *cast(inputs), train=True, rngs={"dropout": rng},
                                mutable=["batch_stats"] if batch_stats is not None else [])
  return logits.astype(jnp.float32), mutated.get("batch_stats")


def _noisy(u: jax.Array, alpha_bar: jax.Array, key: jax.Array) -> jax.Array:
  """A sample of q(z | y) = N(sqrt(alpha_bar) u_y, (1 - alpha_bar) I)."""
  return jnp.sqrt(alpha_bar) * u + jnp.sqrt(1.0 - alpha_bar) * jax.random.normal(key, u.shape)


# ----------------------------------------------------------------------------- losses

def block_loss(cfg: Config, block_params, block_stats, shared, x, y, i, key):
  """Block i's share (paper's t = i + 1) of Eq. 8's denoising term.

  Eq. 8 has (T/2) eta E_t[(SNR(t) - SNR(t-1)) ||u_hat_t - u_y||^2], an
  expectation over t ~ U{1..T}; averaging all T terms computes it exactly, so
  block t contributes (1/T) (T/2) eta dSNR(t) ||u_hat_t - u_y||^2. (Summing
  the T terms without the 1/T would weigh denoising T times too much against
  the cross-entropy and KL terms.) Returns (loss, (new_batch_stats, metrics));
  gradient flows to this block's parameters and, when learned, the embedding.
  """
  sched = schedule(cfg)
  W = embedding_matrix(shared, cfg)
  u = W[y]
  k_noise, k_drop = jax.random.split(key)
  z = _noisy(u, sched.alpha_bar[i], k_noise)
  logits, new_stats = apply_train(cfg, make_model(cfg), block_params, block_stats, x, z,
                                  rng=k_drop)
  u_hat = jax.nn.softmax(logits) @ W
  mse = jnp.mean(jnp.sum((u_hat - u) ** 2, axis=-1))
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return sched.weight[i] * mse / cfg.T, (new_stats, {"mse": mse, "accuracy": acc})


def class_logits(cfg: Config, shared, z_BD: jax.Array) -> jax.Array:
  """log p(y | z_T) up to a constant, for every class: [B, m].

  'softmax' (Eq. 14): f(z_T) = W_out z_T + b_out. 'radial' (Eq. 15-16):
  y_tilde = softmax(f(z_T)) @ W_embed and
  p(y | z_T) proportional to exp(-||y_tilde - u_y||^2 / (2 sigma^2)).
  """
  f = z_BD @ shared["head"]["kernel"] + shared["head"]["bias"][None, :]
  if cfg.classifier == "softmax":
    return f
  W = embedding_matrix(shared, cfg)
  y_tilde = jax.nn.softmax(f) @ W
  sq = jnp.sum((y_tilde[:, None, :] - W[None, :, :]) ** 2, axis=-1)
  return -sq / (2.0 * cfg.radial_sigma**2)


def head_loss(cfg: Config, shared, y, key):
  """-log p(y | z_T), z_T ~ q(z_T | y), plus KL(q(z_0 | y) || N(0, I)) in closed form."""
  sched = schedule(cfg)
  u = embedding_matrix(shared, cfg)[y]
  z_T = _noisy(u, sched.alpha_bar[-1], key)
  logits = class_logits(cfg, shared, z_T)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  ab0 = sched.alpha_bar[0]
  kl = 0.5 * jnp.mean(jnp.sum(ab0 * u**2 + (1 - ab0) - 1 - jnp.log1p(-ab0), axis=-1))
  return ce + kl, {"ce": ce, "kl": kl}


# ----------------------------------------------------------------------------- per-block gradients

def _scaled_block_loss(cfg, scale, *args):
  loss, aux = block_loss(cfg, *args)
  return scale * loss, aux


def _block_grad_fn(cfg, shared, x, y, scale: float = 1.0):
  """(params_i, stats_i, i, key_i) -> (loss, new_stats, grad_params, grad_shared, metrics)
  of `scale * block_loss`."""
  vg = jax.value_and_grad(partial(_scaled_block_loss, cfg, scale), argnums=(0, 2), has_aux=True)

  def one(p, s, i, k):
    (loss, (new_s, m)), (gp, gs) = vg(p, s, shared, x, y, i, k)
    return loss, new_s, gp, gs, m

  return one


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unrolled(fn: Callable, k: int) -> Callable:
  """fn over k stacked blocks as k separate copies in the program (no batching)."""

  def mapped(*stacked):
    return _stack([fn(*jax.tree.map(lambda a: a[i], stacked)) for i in range(k)])

  return mapped


def block_gradients(cfg: Config, formulation: str, blocks, shared, x, y, key,
                    blocks_per_step: int | None = None):
  """Every block's loss and gradient, mapped over the stacked T axis.

  k = `blocks_per_step` blocks are computed at once ('vmap': batched into one
  program, fast on GPU/TPU; 'unroll': k copies, fast on XLA:CPU) and the T / k
  chunks run one after another in a `lax.scan` inside the same step; 'scan' is
  k = 1. Chunk c holds blocks {c, c + T/k, c + 2T/k, ...}, so on a mesh whose
  'blocks' axis splits the stacked T axis every chunk spreads over all devices.
  The results are the same for every k up to floating-point reordering; k
  trades speed for temporary memory. Shared-parameter gradients are summed
  over blocks. Returns (loss [T], new batch_stats, grads [T...], shared grads, metrics).
  """
  T = cfg.T
  k = 1 if formulation == "scan" else (blocks_per_step or T)
  if formulation not in ("vmap", "unroll", "scan"):
    raise ValueError(f"unknown formulation {formulation!r}")
  if T % k:
    raise ValueError(f"blocks_per_step {k} must divide T={T}")
  one = _block_grad_fn(cfg, shared, x, y)
  inner = _unrolled(one, k) if formulation == "unroll" else jax.vmap(one)
  idx = jnp.arange(T)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, idx)
  xs = (blocks["params"], blocks["batch_stats"], idx, keys)
  sum_blocks = lambda g: jax.tree.map(lambda a: a.sum(0), g)
  if k == T:
    loss, new_s, gp, gs, m = inner(*xs)
    return loss, new_s, gp, sum_blocks(gs), m
  n = T // k  # chunks; [T, ...] -> [n, k, ...] with chunk c = blocks c, c + n, ...
  to_chunks = lambda t: jax.tree.map(lambda a: a.reshape(k, n, *a.shape[1:]).swapaxes(0, 1), t)
  from_chunks = lambda t: jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(T, *a.shape[2:]), t)

  def body(acc, chunk):
    loss, new_s, gp, gs, m = inner(*chunk)
    return jax.tree.map(jnp.add, acc, sum_blocks(gs)), (loss, new_s, gp, m)

  gs, out = lax.scan(body, jax.tree.map(jnp.zeros_like, shared), to_chunks(xs))
  loss, new_s, gp, m = from_chunks(out)
  return loss, new_s, gp, gs, m


# ----------------------------------------------------------------------------- training steps

def step_key(cfg: Config, step: jax.Array) -> jax.Array:
  """The training step's PRNG key: fold_in of the step (every method draws its noise from it)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 1), step)


def _update_shared(cfg: Config, state: State, g_from_blocks, y: jax.Array, key: jax.Array):
  """The head/embedding step: head loss (CE + KL) plus the blocks' gradients to `shared`.

  Returns (head loss, head metrics, new shared params, new shared optimizer state).
  """
  (loss_h, mh), g_head = jax.value_and_grad(partial(head_loss, cfg), has_aux=True)(
      state["shared"], y, key)
  g_shared = jax.tree.map(jnp.add, g_from_blocks, g_head)
  upd, opt_shared = optimizer(cfg).update(g_shared, state["opt_shared"], state["shared"])
  return loss_h, mh, optax.apply_updates(state["shared"], upd), opt_shared


def parallel_step(cfg: Config, state: State, x: jax.Array, y: jax.Array) -> tuple[State, Metrics]:
  """One optimizer step of all T blocks (and the head/embedding) on one batch."""
  x = to_float(x)
  key = step_key(cfg, state["step"])
  k_blocks, k_head = jax.random.split(key)
  loss_b, new_stats, g_blocks, g_shared, m = block_gradients(
      cfg, cfg.resolved_formulation(), state["blocks"], state["shared"], x, y, k_blocks,
      cfg.resolved_blocks_per_step())
  loss_h, mh, shared, opt_shared = _update_shared(cfg, state, g_shared, y, k_head)
  params = state["blocks"]["params"]
  upd, opt_blocks = jax.vmap(optimizer(cfg).update)(g_blocks, state["opt_blocks"], params)
  new_state = {"step": state["step"] + 1,
               "blocks": {"params": optax.apply_updates(params, upd), "batch_stats": new_stats},
               "shared": shared, "opt_blocks": opt_blocks, "opt_shared": opt_shared}
  metrics = {"loss": loss_b.sum() + loss_h, "block_loss": loss_b, "block_mse": m["mse"],
             "block_accuracy": m["accuracy"], **mh}
  return new_state, metrics


def sequential_step(cfg: Config, state: State, x: jax.Array, y: jax.Array,
                    block: jax.Array) -> tuple[State, Metrics]:
  """Algorithm 1's step: update only block `block` (a traced index) and the head/embedding.

  Its objective is Eq. 8 with E_t estimated by the one t being trained:
  CE + KL + (T/2) eta dSNR(t) ||u_hat_t - u_y||^2, i.e. T times the block's share.
  """
  x = to_float(x)
  key = step_key(cfg, state["step"])
  k_block, k_head = jax.random.split(key)
  take = lambda tree: jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, block, keepdims=False), tree)
  put = lambda tree, new: jax.tree.map(
      lambda a, v: lax.dynamic_update_index_in_dim(a, v, block, 0), tree, new)
  one = _block_grad_fn(cfg, state["shared"], x, y, scale=float(cfg.T))
  p, s, o = take(state["blocks"]["params"]), take(state["blocks"]["batch_stats"]), take(state["opt_blocks"])
  loss_b, new_s, g_p, g_shared, m = one(p, s, block, jax.random.fold_in(k_block, block))
  loss_h, mh, shared, opt_shared = _update_shared(cfg, state, g_shared, y, k_head)
  upd, new_o = optimizer(cfg).update(g_p, o, p)
  new_state = {"step": state["step"] + 1,
               "blocks": {"params": put(state["blocks"]["params"], optax.apply_updates(p, upd)),
                          "batch_stats": put(state["blocks"]["batch_stats"], new_s)},
               "shared": shared, "opt_blocks": put(state["opt_blocks"], new_o),
               "opt_shared": opt_shared}
  return new_state, {"loss": loss_b + loss_h, "block_mse": m["mse"],
                     "block_accuracy": m["accuracy"], **mh}


@partial(jax.jit, static_argnums=0)
def loss(cfg: Config, state: State, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
  """The total NoProp-DT objective (Eq. 8, summed over t) on one batch, in training mode."""
  x = to_float(x)
  k_blocks, k_head = jax.random.split(key)
  idx = jnp.arange(cfg.T)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(k_blocks, idx)  # as block_gradients draws them
  one = lambda p, s, i, k: block_loss(cfg, p, s, state["shared"], x, y, i, k)[0]
  loss_b = jax.vmap(one)(state["blocks"]["params"], state["blocks"]["batch_stats"], idx, keys)
  return loss_b.sum() + head_loss(cfg, state["shared"], y, k_head)[0]


def make_train_step(cfg: Config) -> Callable[[State, jax.Array, jax.Array], tuple[State, Metrics]]:
  """Jitted `(state, x, y) -> (state, metrics)` updating all blocks; donates `state`."""
  return jax.jit(partial(parallel_step, cfg), donate_argnums=0)


# ----------------------------------------------------------------------------- inference

def image_features(cfg: Config, state: State, x: jax.Array) -> jax.Array:
  """Each block's image pathway on x: [T, B, 256]. Independent of z, so computed once."""
  model = make_model(cfg)
  x = to_float(x)
  f = lambda p, s: model.apply({"params": p, "batch_stats": s}, x, train=False,
                               method=DTBlock.features)
  params, stats = state["blocks"]["params"], state["blocks"]["batch_stats"]
  if cfg.resolved_formulation() == "unroll":  # XLA:CPU runs grouped (vmapped) convs slowly
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    return jnp.stack([f(take(params, i), take(stats, i)) for i in range(cfg.T)])
  return jax.vmap(f)(params, stats)


def denoise_chain(cfg: Config, state: State, feats_TBF: jax.Array, z0_BD: jax.Array,
                  eps_TBD: jax.Array) -> jax.Array:
  """z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t for t = 1..T (lax.scan)."""
  sched, model = schedule(cfg), make_model(cfg)
  W = embedding_matrix(state["shared"], cfg)

  def step(z, inp):
    p, s, f, a, b, c, eps = inp
    logits = model.apply({"params": p, "batch_stats": s}, f, z, train=False,
                         method=DTBlock.logits_from_features)
    return a * (jax.nn.softmax(logits) @ W) + b * z + jnp.sqrt(c) * eps, None

  xs = (state["blocks"]["params"], state["blocks"]["batch_stats"], feats_TBF,
        sched.a, sched.b, sched.c, eps_TBD)
  return lax.scan(step, z0_BD, xs)[0]


def output_logits(cfg: Config, state: State, z_BD: jax.Array) -> jax.Array:
  return class_logits(cfg, state["shared"], z_BD)


@partial(jax.jit, static_argnames=("cfg", "mode"))
def predict(cfg: Config, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str | None = None) -> jax.Array:
  """Class logits for images x [B, H, W, C].

  mode 'mean' (default): the deterministic mean path, z_0 = E[z_0] = 0 and
  eps_t = 0; it is reproducible and, early in training, more accurate than
  sampling (DESIGN.md section 10). mode 'stochastic': the paper's sampling,
  z_0 ~ N(0, I) and eps_t ~ N(0, I); needs `key`.
  """
  check_images(x, cfg)
  mode = mode or cfg.inference
  feats = image_features(cfg, state, x)
  shape = (x.shape[0], cfg.embedding_dim)
  if mode == "mean":
    z0, eps = jnp.zeros(shape), jnp.zeros((cfg.T, *shape))
  elif mode == "stochastic":
    if key is None:
      raise ValueError("stochastic inference needs a PRNG key")
    k0, k1 = jax.random.split(key)
    z0, eps = jax.random.normal(k0, shape), jax.random.normal(k1, (cfg.T, *shape))
  else:
    raise ValueError(f"unknown inference mode {mode!r}; choose 'mean' or 'stochastic'")
  return output_logits(cfg, state, denoise_chain(cfg, state, feats, z0, eps))


def eval_counts(cfg: Config, state: State, x: jax.Array, y: jax.Array, key: jax.Array,
                runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with the mean path, [runs] correct with sampling) on one batch.

  Each block's image pathway runs once; the mean path and every sampled run
  reuse it. Labels of -1 (padding) never count.
  """
  feats = image_features(cfg, state, x)
  B = y.shape[0]
  shape = (cfg.T, B, cfg.embedding_dim)
  z_mean = denoise_chain(cfg, state, feats, jnp.zeros(shape[1:]), jnp.zeros(shape))
  correct = lambda z: jnp.sum(jnp.argmax(output_logits(cfg, state, z), -1) == y)

  def sample(k):
    k0, k1 = jax.random.split(k)
    return correct(denoise_chain(cfg, state, feats, jax.random.normal(k0, shape[1:]),
                                 jax.random.normal(k1, shape)))

  stoch = jax.vmap(sample)(jax.random.split(key, runs)) if runs else jnp.zeros((0,), jnp.int32)
  return correct(z_mean), stoch
