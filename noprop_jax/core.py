"""What every method shares, each piece in one place.

Inputs and keys, calling a block of any signature (with bf16 compute), the
class embedding and linear head, the Gaussian pieces of the objectives,
inference noise, the optimizers, and how T stacked blocks are mapped on this
backend. Method modules import this one and never each other.

A *block* is any Flax module whose `__call__` has the method's signature:
`(x, z) -> logits [B, m]` (NoProp-DT, backprop) or `(x, z, t) -> logits`
(NoProp-CT, -FM, the adjoint), with an optional `train` keyword (dropout,
BatchNorm). A block may also split itself as `features(x)` (the pathway that
ignores z and t) and `from_features(h, z[, t])` (the rest); inference then
computes `features` once per input instead of at every block or solver step.
`from_features` receives t as a scalar (every row of an ODE solve is at the
same time); `__call__` always gets t as [B].
"""

import dataclasses
import inspect
import math
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from noprop_jax import sharding

State = dict[str, Any]
Metrics = dict[str, jax.Array]

EMBEDDINGS = ("onehot", "learned", "prototype")
FORMULATIONS = ("auto", "vmap", "unroll", "scan")
PRECISIONS = ("float32", "bfloat16")
INFERENCE_MODES = ("mean", "stochastic")
LEARNED_DIM = 20  # a learned embedding's default size (the paper's CIFAR-100 rows)


def check_choice(name: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def check_positive(name: str, value, strict: bool = True) -> None:
  if not (value > 0 if strict else value >= 0):
    raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {value}")


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Optim:
  """Optimizer settings (paper Table 4). Each method builds its optimizer from them."""

  lr: float = 1e-3  # learning rate
  weight_decay: float = 1e-3  # AdamW's decoupled decay (DT, baselines) or Adam's L2 (CT, FM)
  grad_clip: float = 1.0  # clip by the gradient norm of each block / parameter group; 0: off

  def __post_init__(self):
    # inf passes a plain `> 0` check, and any non-finite setting makes every update non-finite.
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"learning rate must be > 0 and finite, got lr={self.lr}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"weight_decay must be >= 0 and finite, got weight_decay={self.weight_decay}")
    if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
      raise ValueError("grad_clip must be >= 0 and finite (0 disables clipping), got "
                       f"grad_clip={self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class Compute:
  """How a step executes; the results are the same up to float reordering."""

  formulation: str = "auto"  # stacked blocks: vmap | unroll | scan; auto: by backend
  blocks_per_step: int = 0  # blocks computed at once (a divisor of T); 0: all T
  precision: str = "float32"  # compute dtype; bfloat16 keeps float32 parameters

  def __post_init__(self):
    check_choice("formulation", self.formulation, FORMULATIONS)
    check_choice("precision", self.precision, PRECISIONS)
    if self.blocks_per_step < 0:
      raise ValueError(f"blocks_per_step must be >= 0 (0: all T), got {self.blocks_per_step}")
    if self.formulation == "scan" and self.blocks_per_step not in (0, 1):
      raise ValueError("formulation scan is one block at a time (blocks_per_step 1), got "
                       f"{self.blocks_per_step}")

  def resolve(self, T: int, mesh_blocks: int = 1, auto: str | None = None,
              backend: str | None = None) -> "Compute":
    """Concrete settings for T blocks on `backend` (default: JAX's default backend; call
    outside traced code).

    'auto' is `auto` where a method gives one (its `AUTO_FORMULATION`), else 'unroll' on
    XLA:CPU, where batched (vmapped) convolutions and conv weight gradients in loops are
    slow, and 'vmap' on GPU/TPU or when the blocks are split over a mesh."""
    form = self.formulation if self.formulation != "auto" or auto is None else auto
    if form == "auto":
      cpu = (backend or jax.default_backend()) == "cpu"
      form = "unroll" if cpu and mesh_blocks == 1 else "vmap"
    k = 1 if form == "scan" else (self.blocks_per_step or T)
    if T % k:
      raise ValueError(f"blocks_per_step must divide T={T} (or be 0: all T), got {k}")
    return dataclasses.replace(self, formulation=form, blocks_per_step=k)


# ----------------------------------------------------------------------------- inputs and keys

def to_float(x: jax.Array) -> jax.Array:
  """uint8 pixels to [0, 1]; any other input as float32, unchanged."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def check_inputs(x, input_shape: tuple[int, ...]) -> None:
  if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
    want = ", ".join(map(str, ("batch", *input_shape)))
    raise ValueError(f"inputs must have shape [{want}] (the model's input_shape "
                     f"{tuple(input_shape)}), got x of shape {tuple(x.shape)}")


PIXELS = "pass uint8 pixels 0..255 or floats in [0, 1]"
LEVELS_MAX = 16  # uint8 inputs whose maximum is 1..16 look like levels, not 0..255 pixels


def check_batch(model, x, y=None, padding: bool = False) -> None:
  """What the functional API checks of a batch x [B, *model.input_shape] (and labels y [B]),
  raising a one-line ValueError: shapes and dtypes always (they are static, so this works
  under any jit), values only where the arrays are concrete (not traced): labels in
  [0, num_classes) (`padding`: -1 too, rows that never count), float inputs finite and in
  [0, 1], uint8 inputs not 0..16 levels."""
  check_inputs(x, model.input_shape)
  if x.shape[0] == 0:
    raise ValueError(f"inputs x must hold at least one example, got an empty batch of shape "
                     f"{tuple(x.shape)}")
  if not (x.dtype == np.uint8 or jnp.issubdtype(x.dtype, jnp.floating)):
    raise ValueError(f"inputs x have dtype {x.dtype}: {PIXELS}")
  if y is not None:
    m = model.num_classes
    if y.ndim != 1:
      raise ValueError(f"labels y must be class indices of shape [batch], got shape "
                       f"{tuple(y.shape)}; for one-hot rows pass their argmax, y.argmax(-1)")
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise ValueError(f"labels y must be integer class indices in [0, {m}), got dtype "
                       f"{y.dtype}; cast whole numbers with y.astype(np.int32)")
    if y.shape[0] != x.shape[0]:
      raise ValueError(f"inputs x and labels y must have the same length, got {x.shape[0]} "
                       f"inputs and {y.shape[0]} labels")
  _check_values(model, x, y, padding)


def _check_values(model, x, y, padding: bool) -> None:
  concrete = {k: a for k, a in (("x", x), ("y", y))
              if a is not None and not isinstance(a, jax.core.Tracer)}
  found = dict(zip(concrete, value_ranges(*concrete.values())))
  if "x" in found:
    _check_pixels(x.dtype, *found["x"])
  if "y" in found:
    _check_labels(model.num_classes, padding, *found["y"])


def _check_pixels(dtype, finite: bool, lo, hi) -> None:
  if dtype == np.uint8:
    if 1 <= hi <= LEVELS_MAX:
      raise ValueError(f"inputs x are uint8 with maximum {hi}: that looks like 0..{LEVELS_MAX} "
                       "levels (e.g. sklearn's digits), not 0..255 pixels; scale them to 0..255 "
                       "or pass floats in [0, 1]")
  elif not finite:
    raise ValueError("inputs x must be finite floats in [0, 1], got NaN or inf values")
  elif lo < 0 or hi > 1:
    raise ValueError(f"inputs x must be floats in [0, 1], got values in [{float(lo):g}, "
                     f"{float(hi):g}]; {PIXELS}")


def _check_labels(m: int, padding: bool, _finite: bool, lo, hi) -> None:
  if lo < (-1 if padding else 0) or hi >= m:
    pad = " (or -1: padding)" if padding else ""
    raise ValueError(f"labels y must be class indices in [0, {m}){pad}, got values in [{lo}, {hi}]")


@jax.jit
def _device_range(a: jax.Array):
  return jnp.all(jnp.isfinite(a)), jnp.min(a), jnp.max(a)


def value_ranges(*arrays) -> list[tuple]:
  """(all finite, min, max) of each concrete array as Python scalars, computed where it
  lives: a jax array's on its device, fetching only these scalars (one host sync for all),
  any other's on the host. Works inside a trace, on arrays the trace closes over."""
  with jax.ensure_compile_time_eval():
    out = [_device_range(a) if isinstance(a, jax.Array)
           else (np.isfinite(a).all(), np.min(a), np.max(a)) for a in arrays]
  return [tuple(v.item() for v in r) for r in jax.device_get(out)]


def check_predict(model, x, mode: str, key) -> None:
  """What every method's `predict` checks before tracing: the inputs (`check_batch`), the
  mode, and a key for sampling."""
  check_batch(model, x)
  check_choice("inference mode", mode, INFERENCE_MODES)
  if mode == "stochastic" and key is None:
    raise ValueError("stochastic inference needs a PRNG key")


def new_rng(key: jax.Array) -> jax.Array:
  """The run's key as raw uint32 data: a plain array that checkpoints like any other."""
  return jax.random.key_data(key)


def stream(state: State, tag: int) -> jax.Array:
  """The run's independent random stream `tag` (1: training noise, 2: batch order, 3: evaluation)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), tag)


def step_key(state: State) -> jax.Array:
  """The training step's key: every method draws its noise from it. The seed lives in the
  state, not in a static setting, so runs with different seeds share one compiled step."""
  return jax.random.fold_in(stream(state, 1), state["step"])


# ----------------------------------------------------------------------------- calling blocks

def _takes_train(block: nn.Module, method: str) -> bool:
  return "train" in inspect.signature(getattr(type(block), method)).parameters


def has_split(block: nn.Module) -> bool:
  """Whether the block computes its z- and t-independent pathway separately."""
  return callable(getattr(block, "features", None)) and callable(getattr(block, "from_features", None))


def check_block(block: nn.Module | None, time_conditioned: bool, method: str) -> None:
  """A clear error where `block`'s `__call__` cannot take the method's inputs: (x, z) or,
  `time_conditioned`, (x, z, t), plus an optional `train` keyword. None passes (a config
  validated before the data fixes the block)."""
  if block is None:
    return
  want = 3 if time_conditioned else 2
  params = [p for p in list(inspect.signature(type(block).__call__).parameters.values())[1:]
            if p.name != "train" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = sum(p.default is p.empty for p in params)
  if not required <= want <= len(params):
    sig = "(x, z, t)" if time_conditioned else "(x, z)"
    kind = ("a time-conditioned block, e.g. blocks.CTBlock, MLPTimeBlock or ViTTimeBlock"
            if time_conditioned else "a block without t, e.g. blocks.DTBlock, MLPBlock or ViTBlock")
    raise ValueError(f"{method} calls its block as block{sig}, but {type(block).__name__}.__call__ "
                     f"takes ({', '.join(p.name for p in params)}): use {kind}")


def init_block(block: nn.Module, key: jax.Array, *inputs) -> dict:
  """The block's variables ({'params', ...}) for example inputs."""
  kw = {"train": False} if _takes_train(block, "__call__") else {}
  return dict(block.init({"params": key}, *inputs, **kw))


def compute_dtype(precision: str):
  return jnp.bfloat16 if precision == "bfloat16" else jnp.float32


def apply(block: nn.Module, variables: dict, *inputs, train: bool = False,
          rng: jax.Array | None = None, method: str = "__call__",
          precision: str = "float32") -> tuple[jax.Array, dict]:
  """`block.apply` for any block: passes `train` where the method takes it, updates the
  non-parameter collections (BatchNorm statistics) in training, and computes at
  `precision`: with bfloat16 the float32 parameters and the first two inputs (x or its
  features, and z) are cast inside, so gradients return float32 to the parameters and
  the optimizer state stays float32. A third input, the time or noise level t, stays
  float32: a time embedding multiplies t by ~1000 before its sines, where bfloat16's
  rounding of t (up to 2^-9 near 1) would be radians of phase. The block casts its
  embedding of t, whose values are in [-1, 1], to the compute dtype itself.
  Returns (float32 output, updated collections: {} outside training or without any)."""
  dtype = compute_dtype(precision)
  cast = lambda t: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
  if dtype != jnp.float32:
    variables = {**variables, "params": cast(variables["params"])}
    inputs = (*cast(inputs[:2]), *inputs[2:])
  mutable = ([c for c in variables if c != "params"] if train else []) or False
  kw = {"train": train} if _takes_train(block, method) else {}
  out = block.apply(variables, *inputs, method=None if method == "__call__" else method,
                    rngs={"dropout": rng} if rng is not None else None, mutable=mutable, **kw)
  out, updates = out if mutable else (out, {})
  return out.astype(jnp.float32), dict(updates)


def features(block: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
  """The block's z-independent pathway on x, or x itself for a block without the split."""
  return apply(block, variables, x, method="features")[0] if has_split(block) else x


def from_features(block: nn.Module, variables: dict, h: jax.Array, z: jax.Array,
                  *t: jax.Array) -> jax.Array:
  """The block's output given `features` (inference mode). An optional scalar t is
  passed as it is to `from_features`, and as [B] to a block's `__call__`."""
  if has_split(block):
    return apply(block, variables, h, z, *t, method="from_features")[0]
  return apply(block, variables, h, z, *(jnp.full((z.shape[0],), s) for s in t))[0]


# ----------------------------------------------------------------------------- embeddings, head

def embedding_dim(kind: str, dim: int, num_classes: int, input_size: int) -> int:
  """d: one-hot has m, prototype the input size, learned `dim` (default 20)."""
  check_choice("embedding", kind, EMBEDDINGS)
  fixed = {"onehot": (num_classes, "the number of classes"),
           "prototype": (input_size, "the input size (product of input_shape)")}
  if kind in fixed:
    want, what = fixed[kind]
    if dim not in (0, want):
      raise ValueError(f"embedding_dim={dim} with a {kind} embedding: it must equal {what} "
                       f"({want}) or be 0; use embedding 'learned' for another size")
    return want
  if dim < 0:
    raise ValueError(f"embedding_dim must be >= 0 (0: {LEARNED_DIM}), got {dim}")
  return dim or LEARNED_DIM


def model_dim(model) -> int:
  """d of a method's Model with `embedding` and `embedding_dim` settings."""
  return embedding_dim(model.embedding, model.embedding_dim, model.num_classes,
                       math.prod(model.input_shape))


def init_embedding(kind: str, key: jax.Array, m: int, d: int,
                   embed: jax.Array | None = None) -> jax.Array | None:
  """W_embed's initial value: None for one-hot (the fixed identity); orthonormal rows (or
  columns, when d < m) for learned; `embed` (`prototypes.prototype_embedding`) for prototype."""
  if kind == "onehot":
    return None
  if kind == "learned":
    return nn.initializers.orthogonal()(key, (m, d), jnp.float32)
  if embed is None:
    raise ValueError("a prototype embedding is initialised from the training inputs: pass "
                     "embed=prototypes.prototype_embedding(inputs, labels, num_classes)")
  if tuple(embed.shape) != (m, d):
    raise ValueError(f"prototype embedding must have shape ({m}, {d}), got {tuple(embed.shape)}")
  return jnp.asarray(embed, jnp.float32)


def embedding_matrix(params: dict, m: int) -> jax.Array:
  """W_embed [m, d]: the learned matrix where there is one, else the one-hot identity."""
  return params["embed"] if "embed" in params else jnp.eye(m, dtype=jnp.float32)


def label_rows(W_MD: jax.Array, y: jax.Array) -> jax.Array:
  """W_MD[y], the embedding rows of labels y: [B, d], written as one_hot(y) @ W. The same
  values (each a product by 1, at the highest matmul precision), but its gradient in W
  is a matmul, which a mesh's 'data' axis splits, where the gather's (a scatter-add)
  makes XLA gather every device's rows first."""
  # Not jax.nn.one_hot, whose iota takes y's sharding, which JAX refuses inside shard_map.
  onehot = (y[:, None] == jnp.arange(W_MD.shape[0])[None, :]).astype(W_MD.dtype)
  return jnp.dot(onehot, W_MD, precision=lax.Precision.HIGHEST)


def zero_head(d: int, m: int) -> dict:
  """A linear head at zero: softmax regression on z is convex, and from zero Adam's first
  step already points it the right way; a random start needs thousands of steps to undo."""
  return {"kernel": jnp.zeros((d, m), jnp.float32), "bias": jnp.zeros((m,), jnp.float32)}


READOUT_SCALE = 10.0


def readout_head(W_MD: jax.Array) -> dict:
  """A linear head that starts as a nearest-embedding readout, logits_c = 10 <u_c, z> /
  mean ||u||^2, for the baselines, whose head is trained only through the network's own
  z (entries within the embeddings' range): from zero no gradient would reach the blocks,
  and from a random start AdamW needs thousands of steps to grow separating logits."""
  scale = READOUT_SCALE / jnp.mean(jnp.sum(W_MD**2, axis=-1))
  return {"kernel": scale * W_MD.T, "bias": jnp.zeros((W_MD.shape[0],), jnp.float32)}


def chain_link(z_BD: jax.Array, alpha, logits: jax.Array, W_MD: jax.Array) -> jax.Array:
  """One link of the baselines' chain: z_t = (1 - alpha_t) z_{t-1} + alpha_t softmax(logits) @ W."""
  return (1.0 - alpha) * z_BD + alpha * (jax.nn.softmax(logits) @ W_MD)


def head_logits(head: dict, z_BD: jax.Array) -> jax.Array:
  """The linear classifier W_out z + b_out: [B, m]."""
  return z_BD @ head["kernel"] + head["bias"][None, :]


def sq_dist(z_BD: jax.Array, W_MD: jax.Array) -> jax.Array:
  """||z_b - u_c||^2 for every row and class: [B, m]."""
  return jnp.sum((z_BD[:, None, :] - W_MD[None, :, :]) ** 2, axis=-1)


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


# ----------------------------------------------------------------------------- Gaussian pieces

def noisy(u: jax.Array, alpha_bar, one_minus_alpha_bar, key: jax.Array) -> jax.Array:
  """A sample of q(z | y) = N(sqrt(alpha_bar) u_y, (1 - alpha_bar) I); alpha_bar a scalar
  or one value per row ([B, 1])."""
  eps = jax.random.normal(key, u.shape)
  return jnp.sqrt(alpha_bar) * u + jnp.sqrt(one_minus_alpha_bar) * eps


def gaussian_kl(u: jax.Array, alpha_bar, log_one_minus_alpha_bar) -> jax.Array:
  """KL(N(sqrt(a) u_y, (1 - a) I) || N(0, I)) in closed form, averaged over the batch:
  (1/2) sum_d [a u^2 + (1 - a) - 1 - log(1 - a)]."""
  return 0.5 * jnp.mean(jnp.sum(alpha_bar * u**2 - alpha_bar - log_one_minus_alpha_bar, axis=-1))


def inference_noise(mode: str, shape: tuple[int, ...], key: jax.Array | None) -> jax.Array:
  """Inference's starting noise: zeros on the deterministic mean path ('mean'), N(0, I)
  draws for the paper's sampling ('stochastic', needs `key`)."""
  check_choice("inference mode", mode, INFERENCE_MODES)
  if mode == "mean":
    return jnp.zeros(shape, jnp.float32)
  if key is None:
    raise ValueError("stochastic inference needs a PRNG key")
  return jax.random.normal(key, shape)


def eval_paths(solve: Callable, scores: Callable, h: Any, y: jax.Array, key: jax.Array,
               runs: int, d: int) -> tuple[jax.Array, jax.Array]:
  """(correct on the mean path, [runs] correct when sampling) on one batch of a method
  that maps z_0 to scores: the mean path (z_0 = 0) and `runs` draws z_0 ~ N(0, I) go
  through `solve(h, z_0)` together as one [(1 + runs) B, d] batch, with `h` (the
  inputs' features) tiled to match. Labels -1 (padding) never count."""
  B = y.shape[0]
  z0 = jnp.concatenate([jnp.zeros((B, d)), jax.random.normal(key, (runs * B, d))])
  h = jax.tree.map(lambda a: jnp.concatenate([a] * (1 + runs)), h)
  c = count_correct(scores(solve(h, z0)), y, 1 + runs)
  return c[0], c[1:]


def count_correct(scores: jax.Array, y: jax.Array, runs: int) -> jax.Array:
  """[runs] correct predictions of `runs` stacked batches of scores; labels -1 never count."""
  pred = jnp.argmax(scores, -1).reshape(runs, -1)
  return jnp.sum(pred == y[None, :], axis=1)


# ----------------------------------------------------------------------------- optimizers

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


# ----------------------------------------------------------------------------- stacked blocks

def take(tree: Any, i) -> Any:
  """Block i's slice of a tree stacked on a leading T axis (i may be traced)."""
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def put(tree: Any, i, new: Any) -> Any:
  return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v, i, 0), tree, new)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def chain_compute(T: int, compute: Compute | None) -> Compute:
  """How inference runs T stacked blocks, all at once: unrolled where the training step
  unrolls (XLA:CPU), else 'vmap' (`map_blocks` vmaps, `fold_blocks` scans the chain)."""
  form = (compute or Compute()).resolve(T).formulation
  return Compute("unroll" if form == "unroll" else "vmap")


def map_blocks(fn: Callable, xs: Any, compute: Compute) -> Any:
  """fn(x_t) over the leading T axis of the pytree `xs`, stacked, as `compute` says.

  k = blocks_per_step blocks run at once ('vmap': batched into one program, fast on
  GPU/TPU; 'unroll': k copies, fast on XLA:CPU) and the T / k chunks one after another
  in a `lax.scan` ('scan' is k = 1): fewer at once need less temporary memory. Under a
  context mesh with a 'blocks' axis of n devices, each device maps over its own T / n
  blocks, k / n at once (`sharding.over_blocks`). Same results for every k and mesh up
  to float reordering.
  """
  T = num_stacked(xs)
  k = compute.blocks_per_step or T

  def local(xs):
    n = T // num_stacked(xs)  # the devices the blocks are split over
    if k % n:
      raise ValueError(f"blocks_per_step {k} must be a multiple of the mesh's blocks={n}")
    return _map_chunks(fn, xs, k // n, compute.formulation)

  return sharding.over_blocks(local, xs)


def _map_chunks(fn: Callable, xs: Any, k: int, formulation: str) -> Any:
  """fn over the leading axis of `xs`, k at a time; chunk c holds blocks c, c + n, ..."""
  T = num_stacked(xs)
  if formulation == "unroll":
    inner = lambda c: _stack([fn(jax.tree.map(lambda a: a[i], c)) for i in range(k)])
  else:
    inner = jax.vmap(fn)
  if k == T:
    return inner(xs)
  n = T // k  # [T, ...] -> [n, k, ...]: chunk c = blocks c, c + n, ...
  chunks = jax.tree.map(lambda a: a.reshape(k, n, *a.shape[1:]).swapaxes(0, 1), xs)
  out = lax.scan(lambda _, c: (None, inner(c)), None, chunks)[1]
  return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(T, *a.shape[2:]), out)


def fold_blocks(step: Callable, z0: Any, xs: Any, compute: Compute) -> tuple[Any, Any]:
  """`step(z, x_t) -> (z, out_t)` folded over the stacked blocks in order (a chain):
  unrolled for 'unroll' (conv gradients inside loops are slow on XLA:CPU), else `lax.scan`."""
  if compute.formulation != "unroll":
    return lax.scan(step, z0, xs)
  outs, z = [], z0
  for i in range(jax.tree.leaves(xs)[0].shape[0]):
    z, out = step(z, jax.tree.map(lambda a: a[i], xs))
    outs.append(out)
  return z, _stack(outs)


def init_stacked(block: nn.Module, key: jax.Array, T: int, *inputs) -> dict:
  """T independently initialised copies of the block's variables, stacked on a leading axis."""
  return jax.vmap(lambda k: init_block(block, k, *inputs))(jax.random.split(key, T))


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


def num_stacked(tree: Any) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def count_params(tree: Any) -> int:
  """Parameters in a tree (works on `jax.eval_shape` output too)."""
  return int(sum(a.size for a in jax.tree.leaves(tree)))


def peak_bytes(compiled) -> int | None:
  """What a compiled program needs at once: arguments + outputs - aliased + temporaries
  (XLA's memory analysis), or None where the backend gives none."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
