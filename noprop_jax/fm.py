"""NoProp-FM: one time-conditioned block learning the velocity of a straight path from
noise z_0 to the class embedding u_y (flow matching, Eq. 10-13). t = 0 noise, t = 1 label.

  model = fm.Model(block, input_shape=(64,), num_classes=10)   # any (x, z, t) -> logits block
  state = fm.init(model, jax.random.key(0))
  step = fm.make_train_step(model)
  state, metrics = step(state, x, y)
  scores = fm.predict(model, state, x_test)                    # Euler, nearest embedding

State: {'step', 'rng', 'params': {'block', 'embed' and 'head' (learned or prototype
embedding only)}, 'opt'}.
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from noprop_jax import core, solvers
from noprop_jax.core import Compute, Metrics, Optim, State
from noprop_jax.method import Method, budgets
from noprop_jax.setting import setting

NAME = "NoProp-FM"
STACKED = ()
TIME_CONDITIONED = True  # blocks are (x, z, t) -> logits


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z, t) -> logits [B, num_classes]; see `core` for the protocol
  input_shape: tuple[int, ...]  # one input's shape
  num_classes: int  # m
  embedding: str = setting("onehot", "class embedding: onehot | learned | prototype")
  embedding_dim: int = setting(0, "d; 0: m (onehot), the input size (prototype), 20 (learned)")
  fm_sigma: float = setting(0.0, "std of the Gaussian around the straight path")
  inference_steps: int = setting(1000, "Euler steps from t = 0 to 1 at inference (paper: 1000)")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    core.check_positive("fm_sigma", self.fm_sigma, strict=False)
    if self.inference_steps < 1 or self.num_classes < 2:
      raise ValueError(f"need inference_steps >= 1 and num_classes >= 2, got "
                       f"{self.inference_steps}, {self.num_classes}")
    self.dim  # validates the embedding
    core.check_block(self.block, TIME_CONDITIONED, NAME)

  dim = property(core.model_dim)  # d, the embedding's dimension

  @property
  def anchored(self) -> bool:
    """A learned embedding needs Eq. 13's anchor (a classifier on z_1) against collapse."""
    return self.embedding != "onehot"


def optimizer(optim: Optim):
  """Adam with L2 decay (paper Table 4), each parameter group clipped by its own norm."""
  return core.adam_l2(optim)


@partial(jax.jit, static_argnames=("model", "optim"))  # eager flax init is ~10x slower
def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed: jax.Array | None = None) -> State:
  """Block, embedding (`embed`: prototype rows) with its zero head, optimizer state."""
  k_block, k_embed = jax.random.split(jax.random.fold_in(key, 0))
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z = jnp.zeros((1, model.dim), jnp.float32)
  params = {"block": core.init_block(model.block, k_block, x, z, jnp.zeros((1,)))["params"]}
  W = core.init_embedding(model.embedding, k_embed, model.num_classes, model.dim, embed)
  if W is not None:
    params["embed"] = W
  if model.anchored:
    params["head"] = core.zero_head(model.dim, model.num_classes)
  return {"step": jnp.zeros((), jnp.int32), "rng": core.new_rng(key), "params": params,
          "opt": optimizer(optim).init(params)}


def num_block_params(state: State) -> int:
  return core.count_params(state["params"]["block"])


# ----------------------------------------------------------------------------- the objective

def loss(model: Model, params: dict, x: jax.Array, y: jax.Array, key: jax.Array,
         precision: str = "float32") -> tuple[jax.Array, Metrics]:
  """NoProp-FM's objective on one batch, one t ~ U[0, 1] per example (Eq. 10-11):

    L = E_{t, z_0 ~ N(0, I)} ||v(z_t, x, t) - (u_y - z_0)||^2,
    z_t = t u_y + (1 - t) z_0 + sigma eps,  v = block(x, z_t, t) @ W_embed,

  plus, with a learned embedding, the anchor -log p(y | z_1_hat) on the one-step
  estimate z_1_hat = z_t + (1 - t) v (Eq. 13).
  """
  core.check_batch(model, x, y)
  x = core.to_float(x)
  k_t, k_0, k_eps, k_drop = jax.random.split(key, 4)
  W = core.embedding_matrix(params, model.num_classes)
  u = core.label_rows(W, y)
  t = jax.random.uniform(k_t, (y.shape[0],))
  z_0 = jax.random.normal(k_0, u.shape)
  z_t = t[:, None] * u + (1.0 - t[:, None]) * z_0 + model.fm_sigma * jax.random.normal(k_eps, u.shape)
  logits, _ = core.apply(model.block, {"params": params["block"]}, x, z_t, t, train=True,
                         rng=k_drop, precision=precision)
  v = logits @ W
  fm = jnp.mean(jnp.sum((v - (u - z_0)) ** 2, axis=-1))
  z_1_hat = z_t + (1.0 - t)[:, None] * v
  metrics = {"fm": fm, "block_accuracy": jnp.mean(jnp.argmin(core.sq_dist(z_1_hat, W), -1) == y)}
  if not model.anchored:  # no CE term: reported as 0, so that every run logs the same metrics
    return fm, {**metrics, "ce": jnp.zeros((), jnp.float32)}
  ce = core.cross_entropy(core.head_logits(params["head"], z_1_hat), y)
  return fm + ce, {**metrics, "ce": ce}


def train_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
               y: jax.Array) -> tuple[State, Metrics]:
  """One Adam step of the block (and the embedding and head) on one batch (dropped whole
  where `core.update_ok` fails: metrics['skipped'])."""
  core.check_batch(model, x, y)

  def objective(params, state, x, y, key):
    value, metrics = loss(model, params, x, y, key, compute.precision)
    return value, (metrics, {})

  state, value, m = core.gradient_step(objective, optimizer(optim), state, x, y,
                                        model.num_classes)
  return state, {"loss": value, **m}


def make_train_step(model: Model, optim: Optim = Optim(), compute: Compute = Compute()):
  """`step(state, x, y) -> (state, metrics)`: checks the batch (shapes, dtypes and values:
  one small host sync per call) and runs `step.jitted`, the jitted `train_step` that donates
  `state`. Call `step.jitted` to skip the checks and the sync."""
  return core.jit_step(train_step, model, optim, compute.resolve(1))


# ----------------------------------------------------------------------------- inference

def velocity(model: Model, params: dict):
  """The learned velocity v(t, z) = block(x, z, t) @ W_embed; args are the inputs' `features`."""
  W = core.embedding_matrix(params, model.num_classes)
  return lambda t, z, h: core.from_features(model.block, {"params": params["block"]}, h, z, t) @ W


def integrate(model: Model, state: State, h, z0: jax.Array, steps: int | None = None) -> jax.Array:
  """z_1 from z_0 by Euler in `steps` (default model.inference_steps) steps."""
  return solvers.euler(velocity(model, state["params"]), z0, 0.0, 1.0,
                       steps or model.inference_steps, h)


def features(model: Model, state: State, x: jax.Array):
  """The block's z- and t-independent pathway, computed once per input (x without the split)."""
  return core.features(model.block, {"params": state["params"]["block"]}, core.to_float(x))


def class_scores(model: Model, state: State, z_1: jax.Array) -> jax.Array:
  """Minus the squared distance to each class embedding: the nearest one wins."""
  return -core.sq_dist(z_1, core.embedding_matrix(state["params"], model.num_classes))


def predict(model: Model, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str = "mean", steps: int | None = None) -> jax.Array:
  """Class scores [B, m]. mode 'mean': z_0 = 0; 'stochastic': z_0 ~ N(0, I), needs `key`."""
  core.check_predict(model, x, mode, key)
  return _predict(model, state, x, key, mode, steps)


@partial(jax.jit, static_argnames=("model", "mode", "steps"))
def _predict(model, state, x, key, mode, steps):
  z0 = core.inference_noise(mode, (x.shape[0], model.dim), key)
  return class_scores(model, state, integrate(model, state, features(model, state, x), z0, steps))


def eval_counts(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array,
                key: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct on the mean path, [runs] correct when sampling) on one batch."""
  core.check_batch(model, x, y, padding=True)
  return core.eval_paths(lambda h, z: integrate(model, state, h, z),
                         partial(class_scores, model, state), features(model, state, x), y,
                         key, runs, model.dim)


def block_calls(model: Model) -> int:
  """Block calls to classify one batch: the block at every Euler step (its image pathway once)."""
  return model.inference_steps


def describe(model: Model, compute: Compute, state: State) -> str:
  return (f"one time-conditioned block of {num_block_params(state):,} parameters, "
          f"{model.inference_steps} Euler steps at inference")


METHOD = Method(
    name="fm", title=NAME, Model=Model, init=init, train_step=train_step,
    eval_counts=eval_counts, predict=predict, num_block_params=num_block_params,
    block_calls=block_calls, describe=describe, time_conditioned=TIME_CONDITIONED,
    epochs=budgets(digits=40, mnist=100, cifar10=500, cifar100=1000),
    metrics=("fm", "ce", "block_accuracy"), bf16=True, resumable=("inference_steps",),
    # 1000-step inference costs about 20 digits training epochs: evaluate every 10.
    eval_every={"digits": 10})
