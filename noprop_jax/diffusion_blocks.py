"""DiffusionBlocks: T blocks, each a denoiser of the label embedding over its own range of
noise levels (Sakana AI, 2026).

  block = blocks.CTBlock(num_classes=128)        # any (x, z, t) -> [B, d] block; d = embedding_dim
  model = diffusion_blocks.Model(block, input_shape=(28, 28, 1), num_classes=10)
  state = diffusion_blocks.init(model, jax.random.key(0))
  step = diffusion_blocks.make_train_step(model)
  state, metrics = step(state, x, y)
  logits = diffusion_blocks.predict(model, state, x_test)   # one call of each block

Noise levels sigma are log-normal (log sigma ~ N(p_mean, p_std^2)) restricted to
[sigma_min, sigma_max]. The T blocks split that distribution into T intervals of equal
probability; block 0 owns the noisiest, and each interval is widened on both sides by
`overlap` times its width in log sigma. A block sees z = e_y + sigma eps (e_y: row y
of a learned label table, L2-normalised) for sigma drawn from its own interval, and is
preconditioned as in EDM (Karras et al. 2022): it reads c_in z and the noise level,
outputs F, and D = c_skip z + c_out F is its estimate of e_y, classified by a linear
head and trained on the cross-entropy weighted by w(sigma) = 1 / c_out^2 (`block_term`).
The objective (`loss`) is the expectation over a block drawn at random, each block's term
weighted by `block_weight` = 1 / T; the training step differentiates the same
`block_term`, block by block, and weights its gradient by the same `block_weight`.

Which parameters are whose: each block's network is its own (with its own AdamW:
clipping norm, moments, count); the label table and the head are shared, as in the
authors' code (the blocks must agree on the space z lives in, to hand z to each other
at inference), and are trained on the mean of every block's gradient. Given those, a
block's gradient depends on its own parameters and noise only: no block's output enters
another's objective. The block reads the noise level as t in [0, 1], t = 0 at
sigma_max and t = 1 at sigma_min (affine in log sigma, as EDM's c_noise = ln(sigma) / 4),
so every time-conditioned block of the library fits.

State: {'step', 'rng', 'blocks' (variables, stacked on T), 'shared': {'embed' [m, d],
'head'}, 'opt_blocks' (stacked), 'opt_shared'}, as NoProp-DT's.
"""

import dataclasses
import math
from functools import partial
from statistics import NormalDist

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from noprop_jax import core
from noprop_jax.core import Compute, Metrics, Optim, State
from noprop_jax.method import Method, budgets
from noprop_jax.setting import setting

NAME = "DiffusionBlocks"
STACKED = ("blocks", "opt_blocks")  # state entries whose leaves lead with the T axis
TIME_CONDITIONED = True  # blocks are (x, z, t) -> features [B, d]; t the noise level in [0, 1]
EMBED_INIT_STD = 0.02  # the label table's initial scale (it is normalised in use)


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z, t) -> features [B, embedding_dim]; see `core` for the protocol
  input_shape: tuple[int, ...]  # one input's shape
  num_classes: int  # m
  T: int = setting(3, "number of blocks, each owning 1/T of the noise levels' probability mass")
  overlap: float = setting(
      0.1, "gamma: each interval widened on both sides by this fraction of its log-width")
  embedding_dim: int = setting(
      128, "d: the learned label embedding's size (and the blocks' output size)")
  sigma_min: float = setting(0.002, "smallest noise level")
  sigma_max: float = setting(80.0, "largest noise level (inference starts there)")
  p_mean: float = setting(-1.2, "mean of log sigma")
  p_std: float = setting(1.2, "standard deviation of log sigma")
  sigma_data: float = setting(0.5, "the preconditioning's data scale")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    if self.T < 1:
      raise ValueError(f"T (the number of blocks) must be >= 1, got {self.T}")
    if self.num_classes < 2 or self.embedding_dim < 1:
      raise ValueError(f"need num_classes >= 2 and embedding_dim >= 1, got {self.num_classes}, "
                       f"{self.embedding_dim}")
    if not (math.isfinite(self.overlap) and self.overlap >= 0):
      raise ValueError(f"overlap (gamma) must be >= 0 and finite, got {self.overlap}")
    if not 0 < self.sigma_min < self.sigma_max < math.inf:
      raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
    core.check_positive("p_std", self.p_std)
    core.check_positive("sigma_data", self.sigma_data)
    core.check_block(self.block, TIME_CONDITIONED, NAME)

  @property
  def dim(self) -> int:
    return self.embedding_dim


def block_outputs(settings: dict, num_classes: int) -> int:
  """The output size a block needs for these Model settings: d, not the number of classes."""
  return settings.get("embedding_dim", Model.embedding_dim)


# ----------------------------------------------------------------------------- noise levels

def _dist(model: Model) -> NormalDist:
  return NormalDist(model.p_mean, model.p_std)  # of log sigma


def _mass(model: Model) -> tuple[float, float]:
  """The log-normal's CDF at sigma_min and sigma_max."""
  d = _dist(model)
  return d.cdf(math.log(model.sigma_min)), d.cdf(math.log(model.sigma_max))


def partition(model: Model) -> np.ndarray:
  """The T + 1 boundaries (ascending) that split the restricted log-normal into T intervals
  of equal probability: sigma_i = exp(p_mean + p_std Phi^-1(q_lo + (i / T)(q_hi - q_lo)))."""
  (q_lo, q_hi), d = _mass(model), _dist(model)
  inner = [math.exp(d.inv_cdf(q_lo + i / model.T * (q_hi - q_lo))) for i in range(1, model.T)]
  return np.array([model.sigma_min, *inner, model.sigma_max])


def intervals(model: Model) -> np.ndarray:
  """[T, 2]: block b's (lowest, highest) noise level, block 0 the noisiest, each interval
  widened on both sides by `overlap` times its width in log sigma, within the range."""
  log_s = np.log(partition(model))[::-1]  # descending: block b owns log_s[b + 1] .. log_s[b]
  hi, lo = log_s[:-1], log_s[1:]
  width = hi - lo
  lo = np.maximum(lo - model.overlap * width, math.log(model.sigma_min))
  hi = np.minimum(hi + model.overlap * width, math.log(model.sigma_max))
  out = np.exp(np.stack([lo, hi], axis=-1))
  out[0, 1], out[-1, 0] = model.sigma_max, model.sigma_min  # exactly, not exp(log(.))
  return out


def inference_levels(model: Model) -> np.ndarray:
  """[T] noise levels, descending, equally spaced in probability from sigma_max to sigma_min
  (T = 1: sigma_max alone): level b falls in block b's own interval."""
  (q_lo, q_hi), d = _mass(model), _dist(model)
  if model.T == 1:
    return np.array([model.sigma_max])
  q = [q_hi - b / (model.T - 1) * (q_hi - q_lo) for b in range(model.T)]
  levels = [math.exp(d.inv_cdf(min(max(p, 1e-300), 1 - 1e-16))) for p in q]
  return np.clip(levels, model.sigma_min, model.sigma_max)


def sample_sigma(model: Model, b: jax.Array, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Noise levels of block b (may be traced): the log-normal restricted to its interval, by
  its inverse CDF."""
  d = _dist(model)
  q = jnp.asarray([[d.cdf(math.log(s)) for s in row] for row in intervals(model)], jnp.float32)
  u = jax.random.uniform(key, shape, minval=q[b, 0], maxval=q[b, 1])
  lo, hi = jnp.asarray(intervals(model), jnp.float32)[b]
  return jnp.clip(jnp.exp(model.p_mean + model.p_std * jax.scipy.special.ndtri(u)), lo, hi)


def precondition(sigma, sigma_data: float):
  """EDM's (c_in, c_skip, c_out): the block reads c_in z, of unit variance at every sigma,
  and D = c_skip z + c_out F mixes the input and the block's output by the noise level."""
  v = sigma**2 + sigma_data**2
  return lax.rsqrt(v), sigma_data**2 / v, sigma * sigma_data * lax.rsqrt(v)


def noise_time(model: Model, sigma):
  """The noise level as the blocks' time: 0 at sigma_max, 1 at sigma_min, affine in log sigma."""
  lo, hi = math.log(model.sigma_min), math.log(model.sigma_max)
  return (hi - jnp.log(sigma)) / (hi - lo)


def loss_weight(sigma, sigma_data: float):
  """w(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# ----------------------------------------------------------------------------- the objective

def embedding(shared: dict) -> jax.Array:
  """The label table, each row L2-normalised: e_y, [m, d]."""
  W = shared["embed"]
  return W * lax.rsqrt(jnp.sum(W**2, axis=-1, keepdims=True) + 1e-12)


def denoise(model: Model, variables: dict, shared: dict, x: jax.Array, z: jax.Array,
            sigma: jax.Array, train: bool = False, rng: jax.Array | None = None,
            precision: str = "float32") -> tuple[jax.Array, jax.Array, dict]:
  """(D [B, d], class logits of D [B, m], updated collections) of one block at noise level
  sigma ([B, 1]), z [B, d]: D = c_skip z + c_out block(x, c_in z, t(sigma))."""
  c_in, c_skip, c_out = precondition(sigma, model.sigma_data)
  t_B = noise_time(model, sigma)[:, 0]
  F_BD, updates = core.apply(model.block, variables, x, c_in * z, t_B, train=train, rng=rng,
                             precision=precision)
  D_BD = c_skip * z + c_out * F_BD
  return D_BD, core.head_logits(shared["head"], D_BD), updates


def block_term(model: Model, variables: dict, shared: dict, x: jax.Array, y: jax.Array, b,
               key: jax.Array, precision: str = "float32"):
  """Block b's objective on one batch, E_sigma [w(sigma) CE(head(D(z_sigma)), y)] with
  sigma from its interval and z_sigma = e_y + sigma eps, drawn from fold_in(key, b)
  (`key`: the batch's, shared by all T blocks). `loss` weights it by `block_weight` and
  sums over the blocks; the training step differentiates it block by block. Returns
  (value, (updated collections, its plain cross-entropy, its accuracy))."""
  k_sigma, k_eps, k_drop = jax.random.split(jax.random.fold_in(key, b), 3)
  sigma = sample_sigma(model, b, k_sigma, (y.shape[0], 1))  # [B, 1]
  e_BD = core.label_rows(embedding(shared), y)
  z_BD = e_BD + sigma * jax.random.normal(k_eps, e_BD.shape)
  _, logits_BM, updates = denoise(model, variables, shared, x, z_BD, sigma, True, k_drop,
                                  precision)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BM, y)
  value = jnp.mean(loss_weight(sigma[:, 0], model.sigma_data) * ce_B)
  return value, (updates, jnp.mean(ce_B), jnp.mean(jnp.argmax(logits_BM, -1) == y))


def block_weight(model: Model) -> float:
  """Each block's weight in the objective, 1 / T: the probability of drawing it (each
  block owns 1/T of the noise levels' probability mass)."""
  return 1.0 / model.T


def loss(model: Model, blocks: dict, shared: dict, x: jax.Array, y: jax.Array,
         key: jax.Array, precision: str = "float32") -> tuple[jax.Array, Metrics]:
  """DiffusionBlocks' objective on one batch, a block drawn at random and its noise level
  from its own interval:

    L = sum_b (1 / T) E_{sigma ~ block b's interval, eps} [w(sigma) CE(head(D_b(z_sigma)), y)],
    z_sigma = e_y + sigma eps.

  The training step applies this function's gradient (key = `core.step_key(state)`):
  `gradients` differentiates the same `block_term`, block by block, and weights it by the
  same `block_weight` (tests check that they agree)."""
  core.check_batch(model, x, y)
  x = core.to_float(x)

  # 1. EACH BLOCK'S TERM: E_sigma [w(sigma) CE(head(D_b(z_sigma)), y)] on its own noise draw.
  term = lambda v, b: block_term(model, v, shared, x, y, b, key, precision)
  value_T, (_, ce_T, _) = jax.vmap(term)(blocks, jnp.arange(model.T))

  # 2. THE EXPECTATION OVER BLOCKS: each term times its probability 1 / T (`block_weight`).
  return jnp.sum(block_weight(model) * value_T), {"block_loss": value_T, "block_ce": ce_T}


# ----------------------------------------------------------------------------- training

@partial(jax.jit, static_argnames=("model", "optim"))  # eager flax init is ~10x slower
def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed: jax.Array | None = None) -> State:
  """T independently initialised blocks, the label table (N(0, 0.02^2)), a zero head."""
  if embed is not None:
    raise ValueError(f"{NAME} learns its own label table: no embed to pass")
  k_blocks, k_embed = jax.random.split(jax.random.fold_in(key, 0))
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z, t = jnp.zeros((1, model.dim), jnp.float32), jnp.zeros((1,), jnp.float32)
  blocks = core.init_stacked(model.block, k_blocks, model.T, x, z, t)
  out = jax.eval_shape(lambda v: core.apply(model.block, v, x, z, t)[0], core.take(blocks, 0))
  if out.shape[-1] != model.dim:
    raise ValueError(f"{NAME}'s blocks output features of the embedding's size d = {model.dim} "
                     f"(D = c_skip z + c_out F), but this block outputs {out.shape[-1]}: build it "
                     f"with its output size (num_classes) = {model.dim}")
  shared = {"embed": EMBED_INIT_STD * jax.random.normal(k_embed, (model.num_classes, model.dim)),
            "head": core.zero_head(model.dim, model.num_classes)}
  return core.stacked_state(key, blocks, shared, core.adamw(optim))


def num_block_params(state: State) -> int:
  params = state["blocks"]["params"]
  return core.count_params(params) // core.num_stacked(params)


def gradients(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array):
  """`loss`'s gradient on one batch with the step's key (`core.step_key(state)`): each
  block's `block_term` differentiated in its own parameters and the shared ones, from its
  own term only (`compute`: resolved settings), times `block_weight`, as in `loss`.
  Returns (the blocks' gradients, stacked; the shared parameters' gradient, the sum of
  the blocks' weighted ones; aux: 'block_loss' (each block's unweighted term), 'block_ce',
  'block_accuracy' [T], 'updates' (the blocks' new collections, stacked))."""
  core.check_batch(model, x, y)
  x, key, shared = core.to_float(x), core.step_key(state), state["shared"]
  weight = block_weight(model)

  def one(inp):
    variables, b = inp
    term = lambda p, s: block_term(model, {**variables, "params": p}, s, x, y, b, key,
                                   compute.precision)
    (val, aux), (g_p, g_s) = jax.value_and_grad(term, argnums=(0, 1), has_aux=True)(
        variables["params"], shared)
    return val, aux, jax.tree.map(lambda g: weight * g, (g_p, g_s))

  val, (updates, ce, acc), (g_blocks, g_shared) = core.map_blocks(
      one, (state["blocks"], jnp.arange(model.T)), compute)
  g_shared = jax.tree.map(lambda g: g.sum(0), g_shared)
  return g_blocks, g_shared, {"block_loss": val, "block_ce": ce, "block_accuracy": acc,
                              "updates": updates}


def train_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
               y: jax.Array) -> tuple[State, Metrics]:
  """One step of all T blocks (each by its own AdamW) and the shared table and head on
  `gradients`, dropped whole where `core.update_ok` fails (metrics['skipped'])."""
  g_blocks, g_shared, aux = gradients(model, compute, state, x, y)
  value = jnp.sum(block_weight(model) * aux["block_loss"])  # `loss`'s value
  ok = core.update_ok(value, (g_blocks, g_shared, aux["updates"]), y, model.num_classes)
  update = lambda state: core.stacked_update(core.adamw(optim), state, g_blocks, g_shared,
                                             aux["updates"])
  metrics = {k: aux[k] for k in ("block_loss", "block_ce", "block_accuracy")}
  return core.apply_if(ok, update, state), {"loss": value, "skipped": core.skipped(ok), **metrics}


def make_train_step(model: Model, optim: Optim = Optim(), compute: Compute = Compute()):
  """`step(state, x, y) -> (state, metrics)`: checks the batch (one small host sync per
  call) and runs `step.jitted`, the jitted `train_step` that donates `state`."""
  return core.jit_step(train_step, model, optim, compute.resolve(model.T))


# ----------------------------------------------------------------------------- inference

def sample(model: Model, compute: Compute, state: State, x: jax.Array, z0: jax.Array) -> jax.Array:
  """Class logits [B, m] from z0 [B, d] at sigma_max: at each level sigma_b of
  `inference_levels`, block b's D, the class-weighted embedding softmax(logits) @ E as the
  estimate of e_y, and an Euler step of dz/dsigma = (z - D) / sigma to the next level,
  z <- z + (sigma_next - sigma)(z - D) / sigma (towards D as sigma falls). The last
  block's logits are the prediction: one call of each block in all."""
  levels_T = jnp.asarray(inference_levels(model), jnp.float32)
  next_T = jnp.concatenate([levels_T[1:], levels_T[-1:]])
  E_MD = embedding(state["shared"])

  def step(z_BD, inp):
    v, sigma, sigma_next = inp
    _, logits_BM, _ = denoise(model, v, state["shared"], x, z_BD,
                              jnp.full((z_BD.shape[0], 1), sigma))
    D_BD = jax.nn.softmax(logits_BM) @ E_MD
    return z_BD + (sigma_next - sigma) * (z_BD - D_BD) / sigma, logits_BM

  return core.fold_blocks(step, z0, (state["blocks"], levels_T, next_T), compute)[1][-1]


def start_noise_std(model: Model) -> float:
  """The spread of z at sigma_max: the embedding's (unit rows, at most 1) plus the noise."""
  return math.sqrt(1.0 + model.sigma_max**2)


def predict(model: Model, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str = "mean", compute: Compute | None = None) -> jax.Array:
  """Class logits [B, m]. mode 'mean': z starts at 0 (z's mean at sigma_max);
  'stochastic': z ~ N(0, (1 + sigma_max^2) I), needs `key`."""
  core.check_predict(model, x, mode, key)
  return _predict(model, core.chain_compute(model.T, compute), state, x, key, mode)


@partial(jax.jit, static_argnames=("model", "compute", "mode"))
def _predict(model, compute, state, x, key, mode):
  z0_BD = start_noise_std(model) * core.inference_noise(mode, (x.shape[0], model.dim), key)
  return sample(model, compute, state, core.to_float(x), z0_BD)


def eval_counts(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array,
                key: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct from z = 0, [runs] correct from sampled starts) on one batch."""
  core.check_batch(model, x, y, padding=True)
  compute = core.chain_compute(model.T, compute)
  solve = lambda x, z0: sample(model, compute, state, x, start_noise_std(model) * z0)
  return core.eval_paths(solve, lambda logits: logits, core.to_float(x), y, key, runs, model.dim)


def block_calls(model: Model) -> int:
  """Block calls to classify one batch: each block once."""
  return model.T


def describe(model: Model, compute: Compute, state: State) -> str:
  lv = ", ".join(f"{s:.3g}" for s in inference_levels(model))
  return (f"T={model.T} blocks of {num_block_params(state):,} parameters over noise levels "
          f"{', '.join(f'{s:.3g}' for s in partition(model))} (overlap {model.overlap}), "
          f"inference at {lv}, formulation={compute.formulation}, "
          f"{compute.blocks_per_step} blocks per step")


METHOD = Method(
    name="diffusion_blocks", title=NAME, Model=Model, init=init, train_step=train_step,
    eval_counts=eval_counts, predict=predict, num_block_params=num_block_params,
    block_calls=block_calls, describe=describe, time_conditioned=TIME_CONDITIONED,
    epochs=budgets(digits=12, mnist=100, cifar10=150, cifar100=150), stacked=STACKED,
    metrics=("block_loss", "block_ce", "block_accuracy"), bf16=True,
    block_outputs=block_outputs)
