"""NoProp-DT: T blocks, block t trained to denoise z_{t-1} ~ q(z_{t-1} | y) into u_y.

  model = dt.Model(block, input_shape=(64,), num_classes=10)   # any (x, z) -> logits block
  state = dt.init(model, jax.random.key(0))
  step = dt.make_train_step(model)                             # checks the batch, jitted
  state, metrics = step(state, x, y)
  logits = dt.predict(model, state, x_test)

Block t (t = 1..T; index t - 1 in stacked arrays) sees only its noisy label
z_{t-1} and its own term of Eq. 8 (`denoise_term`: its `denoise_error` times
`denoise_weight`); nothing couples blocks but the shared head and embedding. `loss` is
Eq. 8 as the sum of those terms and the head's (`head_terms`); the training steps
differentiate the same functions, block by block. State (a plain pytree):
  step, rng    int32 step count; the run's key (raw uint32 data)
  blocks       the blocks' variables ({'params', 'batch_stats', ...}), stacked on T
  shared       {'head': {'kernel' [d, m], 'bias' [m]}, 'embed' [m, d] unless one-hot}
  opt_blocks   the blocks' optimizer state, stacked on T (own moments, counts, clipping)
  opt_shared   optimizer state of `shared`
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from noprop_jax import core
from noprop_jax.core import Compute, Metrics, Optim, State
from noprop_jax.method import Method, budgets
from noprop_jax.schedule import DTSchedule, dt_schedule
from noprop_jax.setting import setting

NAME = "NoProp-DT"
CLASSIFIERS = ("softmax", "radial")
STACKED = ("blocks", "opt_blocks")  # state entries whose leaves lead with the T axis
TIME_CONDITIONED = False  # blocks are (x, z) -> logits


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z) -> logits [B, num_classes]; see `core` for the protocol
  input_shape: tuple[int, ...]  # one input's shape: (H, W, C) images, (D,) vectors, ...
  num_classes: int  # m
  T: int = setting(10, "number of blocks")
  eta: float = setting(0.1, "weight of the denoising terms (paper Table 4)")
  embedding: str = setting("onehot", "class embedding: onehot | learned | prototype")
  embedding_dim: int = setting(0, "d; 0: m (onehot), the input size (prototype), 20 (learned)")
  classifier: str = setting("softmax", "p(y | zT): softmax (Eq. 14) | radial (Eq. 15-16)")
  radial_sigma: float = setting(1.0, "the radial classifier's sigma")
  # The cosine schedule is clipped to [min, max], so every SNR stays finite.
  alpha_bar_min: float = setting(
      1e-4, "the schedule's smallest alpha_bar (at t = 0, the noise end)")
  alpha_bar_max: float = setting(
      0.9999, "the schedule's largest alpha_bar (at t = T, the label end)")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    core.check_choice("classifier", self.classifier, CLASSIFIERS)
    if self.T < 1 or self.num_classes < 2:
      raise ValueError(f"need T >= 1 and num_classes >= 2, got {self.T}, {self.num_classes}")
    core.check_positive("eta", self.eta)
    core.check_positive("radial_sigma", self.radial_sigma)
    if not 0 < self.alpha_bar_min < self.alpha_bar_max < 1:
      raise ValueError("need 0 < alpha_bar_min < alpha_bar_max < 1 so every SNR is finite, "
                       f"got {self.alpha_bar_min}, {self.alpha_bar_max}")
    self.dim  # validates the embedding
    core.check_block(self.block, TIME_CONDITIONED, NAME)

  dim = property(core.model_dim)  # d, the embedding's dimension

  @property
  def schedule(self) -> DTSchedule:
    return dt_schedule(self.T, self.alpha_bar_min, self.alpha_bar_max)


@partial(jax.jit, static_argnames=("model", "optim"))  # eager flax init is ~10x slower
def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed: jax.Array | None = None) -> State:
  """All T blocks initialised independently, a zero head, the embedding (`embed`: the
  prototype rows, embedding 'prototype' only) and the optimizer state."""
  k_blocks, k_embed = jax.random.split(jax.random.fold_in(key, 0))
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z = jnp.zeros((1, model.dim), jnp.float32)
  blocks = core.init_stacked(model.block, k_blocks, model.T, x, z)
  shared = {"head": core.zero_head(model.dim, model.num_classes)}
  W = core.init_embedding(model.embedding, k_embed, model.num_classes, model.dim, embed)
  if W is not None:
    shared["embed"] = W
  return core.stacked_state(key, blocks, shared, core.adamw(optim))


def num_block_params(state: State) -> int:
  """Parameters of one block."""
  params = state["blocks"]["params"]
  return core.count_params(params) // core.num_stacked(params)


# ----------------------------------------------------------------------------- the objective

def class_logits(model: Model, shared: dict, z_BD: jax.Array) -> jax.Array:
  """log p(y | zT) up to a constant, for every class: [B, m].

  'softmax' (Eq. 14): the linear head f(zT) = W_out zT + b_out. 'radial' (Eq. 15-16):
  y_tilde = softmax(f(zT)) @ W_embed and p(y | zT) ~ exp(-||y_tilde - u_y||^2 / (2 sigma^2)).
  """
  f_BM = core.head_logits(shared["head"], z_BD)
  if model.classifier == "softmax":
    return f_BM
  W_MD = core.embedding_matrix(shared, model.num_classes)
  return -core.sq_dist(jax.nn.softmax(f_BM) @ W_MD, W_MD) / (2.0 * model.radial_sigma**2)


def head_terms(model: Model, shared: dict, y: jax.Array, key: jax.Array):
  """Eq. 8's first two terms: -log p(y | zT) with zT ~ q(zT | y), and
  KL(q(z0 | y) || N(0, I)) in closed form. Returns (ce + kl, (ce, kl))."""
  ab = model.schedule.alpha_bar
  u_BD = core.label_rows(core.embedding_matrix(shared, model.num_classes), y)
  zT_BD = core.noisy(u_BD, ab[-1], 1.0 - ab[-1], key)
  ce = core.cross_entropy(class_logits(model, shared, zT_BD), y)
  kl = core.gaussian_kl(u_BD, ab[0], jnp.log1p(-ab[0]))
  return ce + kl, (ce, kl)


def denoise_error(model: Model, variables: dict, W: jax.Array, x: jax.Array, y: jax.Array,
                  t, key: jax.Array, precision: str = "float32"):
  """Block t's squared error ||u_hat_t(z_{t-1}, x) - u_y||^2 (batch mean), with
  z_{t-1} ~ q(z_{t-1} | y) and u_hat_t = softmax(block_t(x, z_{t-1})) @ W_embed
  (W: the embedding, [m, d]). Returns (error, (updated BatchNorm statistics, the block's
  accuracy on its input))."""
  ab = model.schedule.alpha_bar[t - 1]
  k_noise, k_drop = jax.random.split(key)
  u_BD = core.label_rows(W, y)
  z_BD = core.noisy(u_BD, ab, 1.0 - ab, k_noise)
  logits_BM, updates = core.apply(model.block, variables, x, z_BD, train=True, rng=k_drop,
                                  precision=precision)
  err = jnp.mean(jnp.sum((jax.nn.softmax(logits_BM) @ W - u_BD) ** 2, axis=-1))
  return err, (updates, jnp.mean(jnp.argmax(logits_BM, -1) == y))


def denoise_weight(model: Model, t, n_blocks: int):
  """Block t's weight in Eq. 8, (T / 2) eta (SNR(t) - SNR(t-1)) / n_blocks: the factor of
  its error when E_{t ~ U{1..T}} is estimated over `n_blocks` blocks (all T in `loss` and
  `train_step`: the expectation exactly; one in Algorithm 1's `sequential_step`).
  `t` (1..T) may be traced, or an array of blocks."""
  snr = model.schedule.snr
  return 0.5 * model.T * model.eta * (snr[t] - snr[t - 1]) / n_blocks


def denoise_term(model: Model, variables: dict, shared: dict, x: jax.Array, y: jax.Array, t,
                 key: jax.Array, n_blocks: int, precision: str = "float32"):
  """Block t's term of Eq. 8: `denoise_weight` times its `denoise_error`, drawn from
  fold_in(key, t) (`key`: the batch's blocks' key, shared by all T). `loss` sums it over
  the blocks; the training steps differentiate it block by block, in the block's
  parameters and in `shared` (the embedding). Returns (the weighted error, (the error,
  updated BatchNorm statistics, the block's accuracy))."""
  W_MD = core.embedding_matrix(shared, model.num_classes)
  err, (updates, acc) = denoise_error(model, variables, W_MD, x, y, t,
                                      jax.random.fold_in(key, t), precision)
  return denoise_weight(model, t, n_blocks) * err, (err, updates, acc)


def loss(model: Model, blocks: dict, shared: dict, x: jax.Array, y: jax.Array,
         key: jax.Array, precision: str = "float32") -> tuple[jax.Array, Metrics]:
  """NoProp-DT's objective (Eq. 8) on one batch, its three terms computed in turn below:

    L = E_q[-log p(y | zT)]                                                (1. classifier)
        + KL(q(z0 | y) || p(z0))                                          (2. prior)
        + (T / 2) eta E_{t ~ U{1..T}} [(SNR(t) - SNR(t-1))
                                       ||u_hat_t(z_{t-1}, x) - u_y||^2],  (3. denoising)

  the expectation over t computed exactly, as the mean over the T blocks. The training
  step applies this function's gradient (key = `core.step_key(state)`): `gradients`
  differentiates the same `head_terms` and, block by block, the same `denoise_term`
  (tests check that they agree).
  """
  core.check_batch(model, x, y)
  x = core.to_float(x)
  k_blocks, k_head = jax.random.split(key)

  # 1. CLASSIFIER: -log p(y | zT), one sample zT ~ q(zT | y).
  # 2. PRIOR: KL(q(z0 | y) || N(0, I)), in closed form.
  _, (ce, kl) = head_terms(model, shared, y, k_head)

  # 3. DENOISING: block t's error ||u_hat_t(z_{t-1}, x) - u_y||^2, z_{t-1} ~ q(z_{t-1} | y),
  # times (T / 2) eta (SNR(t) - SNR(t-1)) / T (`denoise_weight`), summed over t = 1..T.
  term = lambda v, t: denoise_term(model, v, shared, x, y, t, k_blocks, model.T, precision)[0]
  denoise = jnp.sum(jax.vmap(term)(blocks, jnp.arange(1, model.T + 1)))

  return ce + kl + denoise, {"ce": ce, "kl": kl, "denoise": denoise}


# ----------------------------------------------------------------------------- training steps

def _head_grad(model, shared, y, key):
  """CE + KL (Eq. 8's first two terms), its metrics and its gradient in `shared`."""
  (loss_h, (ce, kl)), g_head = jax.value_and_grad(partial(head_terms, model), has_aux=True)(
      shared, y, key)
  return loss_h, {"ce": ce, "kl": kl}, g_head


def _apply_shared(optim, state, g_shared):
  """The head/embedding's optimizer step on its whole gradient."""
  upd, opt_shared = core.adamw(optim).update(g_shared, state["opt_shared"], state["shared"])
  return optax.apply_updates(state["shared"], upd), opt_shared


def _block_grad(model, shared, x, y, key, precision, n_blocks):
  """(block t's variables, t) -> its `denoise_term` (E_t estimated over `n_blocks` blocks),
  error, updates, accuracy, and the term's gradients in the block's parameters and in
  `shared`."""

  def one(inp):
    variables, t = inp
    term = lambda params, shared: denoise_term(model, {**variables, "params": params}, shared,
                                               x, y, t, key, n_blocks, precision)
    (val, (err, updates, acc)), (g_p, g_s) = jax.value_and_grad(
        term, argnums=(0, 1), has_aux=True)(variables["params"], shared)
    return val, err, updates, acc, g_p, g_s

  return one


def gradients(model: Model, compute: Compute, state: State, x: jax.Array,
              y: jax.Array) -> tuple[dict, dict, dict]:
  """`loss`'s gradient on one batch with the step's key (`core.step_key(state)`), as
  `train_step` applies it (`compute`: resolved settings): `head_terms`' gradient, and
  every block's `denoise_term`'s with E_t over all T blocks, as in `loss`, block t's taken
  from its own term only.

  Returns (the blocks' parameter gradients, stacked on T; the gradient in `shared`: the
  head terms' plus every block's to the embedding; aux: 'block_loss' (each block's weighted
  term), 'block_mse', 'block_accuracy', 'updates' (the blocks' new BatchNorm statistics),
  'head_loss' (CE + KL), 'ce', 'kl')."""
  core.check_batch(model, x, y)
  x = core.to_float(x)
  k_blocks, k_head = jax.random.split(core.step_key(state))
  one = _block_grad(model, state["shared"], x, y, k_blocks, compute.precision, model.T)
  t = jnp.arange(1, model.T + 1)
  val, err, updates, acc, g_blocks, g_from_blocks = core.map_blocks(
      one, (state["blocks"], t), compute)
  loss_h, mh, g_head = _head_grad(model, state["shared"], y, k_head)
  g_shared = jax.tree.map(lambda a, b: a.sum(0) + b, g_from_blocks, g_head)
  aux = {"block_loss": val, "block_mse": err, "block_accuracy": acc, "updates": updates,
         "head_loss": loss_h, **mh}
  return g_blocks, g_shared, aux


def train_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
               y: jax.Array) -> tuple[State, Metrics]:
  """One optimizer step of all T blocks and the head/embedding on one batch: `gradients`
  applied, each block by its own AdamW (own clipping norm, moments and count). The update
  is dropped whole where `core.update_ok` fails (metrics['skipped'] = 1); the step count
  advances either way."""
  g_blocks, g_shared, aux = gradients(model, compute, state, x, y)  # checks the batch
  value = aux["block_loss"].sum() + aux["head_loss"]
  ok = core.update_ok(value, (g_blocks, g_shared, aux["updates"]), y, model.num_classes)

  update = lambda state: core.stacked_update(core.adamw(optim), state, g_blocks, g_shared,
                                             aux["updates"])
  metrics = {k: aux[k] for k in ("block_loss", "block_mse", "block_accuracy", "ce", "kl")}
  return core.apply_if(ok, update, state), {"loss": value, "skipped": core.skipped(ok), **metrics}


def sequential_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
                    y: jax.Array, block: jax.Array) -> tuple[State, Metrics]:
  """Algorithm 1's step: update block `block` (0-based, may be traced) and the head/embedding,
  on Eq. 8 with E_t estimated by that one block (its `denoise_term` with n_blocks = 1);
  dropped whole, as `train_step`'s, where `core.update_ok` fails."""
  core.check_batch(model, x, y)
  if not isinstance(block, jax.core.Tracer) and not 0 <= int(block) < model.T:
    raise ValueError(f"block must be in [0, {model.T}) (0-based), got {int(block)}")
  x = core.to_float(x)
  k_blocks, k_head = jax.random.split(core.step_key(state))
  one = _block_grad(model, state["shared"], x, y, k_blocks, compute.precision, 1)
  variables, o = core.take(state["blocks"], block), core.take(state["opt_blocks"], block)
  val, err, updates, acc, g_p, g_from_block = one((variables, block + 1))
  loss_h, mh, g_head = _head_grad(model, state["shared"], y, k_head)
  g_shared = jax.tree.map(jnp.add, g_from_block, g_head)
  ok = core.update_ok(val + loss_h, (g_p, g_shared, updates), y, model.num_classes)

  def update(state):
    shared, opt_shared = _apply_shared(optim, state, g_shared)
    upd, new_o = core.adamw(optim).update(g_p, o, variables["params"])
    new = {**variables, **updates, "params": optax.apply_updates(variables["params"], upd)}
    return {**state, "blocks": core.put(state["blocks"], block, new), "shared": shared,
            "opt_blocks": core.put(state["opt_blocks"], block, new_o), "opt_shared": opt_shared}

  # The metrics of `train_step`, for the one block trained (block_loss: its weighted term).
  return core.apply_if(ok, update, state), {"loss": val + loss_h, "block_loss": val,
                                            "block_mse": err, "block_accuracy": acc, **mh,
                                            "skipped": core.skipped(ok)}


def make_train_step(model: Model, optim: Optim = Optim(), compute: Compute = Compute()):
  """`step(state, x, y) -> (state, metrics)` updating all blocks: checks the batch (shapes,
  dtypes and values: one small host sync per call) and runs `step.jitted`, the jitted
  `train_step` that donates `state`. Call `step.jitted` to skip the checks and the sync."""
  return core.jit_step(train_step, model, optim, compute.resolve(model.T))


# ----------------------------------------------------------------------------- inference

def features(model: Model, compute: Compute, state: State, x: jax.Array) -> jax.Array | None:
  """Each block's z-independent pathway on x, [T, B, ...], computed once per input;
  None for a block without the split (the chain then runs whole blocks)."""
  if not core.has_split(model.block):
    return None
  x = core.to_float(x)
  return core.map_blocks(lambda v: core.features(model.block, v, x), state["blocks"], compute)


def denoise_chain(model: Model, state: State, x: jax.Array, feats_TB, z0_BD: jax.Array,
                  eps_TBD: jax.Array) -> jax.Array:
  """z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t for t = 1..T (lax.scan);
  each block from its `features` (feats_TB) or, given None, whole on x."""
  s, W = model.schedule, core.embedding_matrix(state["shared"], model.num_classes)
  x = core.to_float(x)

  def step(z_BD, inp):
    v, h_B, a, b, c, eps_BD = inp
    logits_BM = (core.apply(model.block, v, x, z_BD)[0] if h_B is None
                 else core.from_features(model.block, v, h_B, z_BD))
    return a * (jax.nn.softmax(logits_BM) @ W) + b * z_BD + jnp.sqrt(c) * eps_BD, None

  return lax.scan(step, z0_BD, (state["blocks"], feats_TB, s.a, s.b, s.c, eps_TBD))[0]


def predict(model: Model, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str = "mean", compute: Compute | None = None) -> jax.Array:
  """Class logits [B, m] for inputs x.

  mode 'mean': the deterministic mean path, z0 = E[z0] = 0 and eps_t = 0 (reproducible
  and, early in training, more accurate than sampling); 'stochastic': the paper's
  sampling, z0 ~ N(0, I) and eps_t ~ N(0, I), needs `key`.
  """
  core.check_predict(model, x, mode, key)
  return _predict(model, core.chain_compute(model.T, compute), state, x, key, mode)


@partial(jax.jit, static_argnames=("model", "compute", "mode"))
def _predict(model, compute, state, x, key, mode):
  k0, k1 = jax.random.split(key) if key is not None else (None, None)
  shape = (x.shape[0], model.dim)
  z0_BD = core.inference_noise(mode, shape, k0)
  eps_TBD = core.inference_noise(mode, (model.T, *shape), k1)
  zT_BD = denoise_chain(model, state, x, features(model, compute, state, x), z0_BD, eps_TBD)
  return class_logits(model, state["shared"], zT_BD)


def eval_counts(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array,
                key: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with the mean path, [runs] correct with sampling) on one batch; each block's
  `features` run once, for all paths. Labels -1 (padding) never count."""
  core.check_batch(model, x, y, padding=True)
  compute = core.chain_compute(model.T, compute)
  feats_TB = features(model, compute, state, x)
  shape = (model.T, y.shape[0], model.dim)
  correct = lambda z0_BD, eps_TBD: core.count_correct(class_logits(
      model, state["shared"], denoise_chain(model, state, x, feats_TB, z0_BD, eps_TBD)), y, 1)[0]

  def sample(k):
    k0, k1 = jax.random.split(k)
    return correct(jax.random.normal(k0, shape[1:]), jax.random.normal(k1, shape))

  stoch = jax.vmap(sample)(jax.random.split(key, runs)) if runs else jnp.zeros((0,), jnp.int32)
  return correct(jnp.zeros(shape[1:]), jnp.zeros(shape)), stoch


def block_calls(model: Model) -> int:
  """Block calls to classify one batch: each block once."""
  return model.T


def describe(model: Model, compute: Compute, state: State) -> str:
  """One line for the run's banner."""
  return (f"T={model.T}, {num_block_params(state):,} parameters per block, "
          f"formulation={compute.formulation}, {compute.blocks_per_step} blocks per step")


METHOD = Method(
    name="dt", title=NAME, Model=Model, init=init, train_step=train_step,
    eval_counts=eval_counts, predict=predict, num_block_params=num_block_params,
    block_calls=block_calls, describe=describe, time_conditioned=TIME_CONDITIONED,
    epochs=budgets(digits=12, mnist=100, cifar10=150, cifar100=150), stacked=STACKED,
    metrics=("block_loss", "block_mse", "block_accuracy", "ce", "kl"),
    sequential_step=sequential_step, bf16=True)
