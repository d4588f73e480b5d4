"""The adjoint baseline: a neural ODE with a time-conditioned block, trained end to end by
the adjoint method.

  dz/dt = beta (softmax(f(x, z, t)) @ W_embed - z),  t in [0, 1],  z(0) = z_0 ~ N(0, I),
  p(y | x) = softmax(W_out z(1) + b_out),

with W_embed the fixed one-hot embedding, a linear classifier and AdamW. The drift is
the continuous-time limit of the backprop baseline's z_t = (1 - a_t) z_{t-1} + a_t u_hat,
and the learned rate beta = exp(log_rate) the counterpart of its learned a_t. The gradient
does not back-propagate through the solver: `solvers.euler_adjoint` solves the adjoint ODE
backwards (Chen et al., 2018), so training memory does not grow with the number of Euler
steps. The block's z-independent pathway runs once per input, outside the solver; its
gradient arrives through the adjoint's cotangent for the features.

State: {'step', 'rng', 'params': {'block', 'head', 'log_rate'}, 'opt'}.
"""

import dataclasses
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from noprop_jax import core, solvers
from noprop_jax.core import Compute, Metrics, Optim, State
from noprop_jax.method import Method, budgets
from noprop_jax.setting import setting

NAME = "Adjoint baseline"
STACKED = ()
TIME_CONDITIONED = True  # blocks are (x, z, t) -> logits
# beta's initial value: the decay of z_0 through ten backprop blocks that each start at
# alpha = tanh(0.5): (1 - alpha)^10 = exp(-beta), beta = 6.2.
LOG_RATE_INIT = math.log(-10.0 * math.log1p(-math.tanh(0.5)))


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z, t) -> logits [B, num_classes], as for NoProp-CT
  input_shape: tuple[int, ...]  # one input's shape
  num_classes: int  # m (the one-hot embedding's dimension)
  inference_steps: int = setting(1000, "Euler steps from t = 0 to 1, in training and inference")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    if self.inference_steps < 1 or self.num_classes < 2:
      raise ValueError(f"need inference_steps >= 1 and num_classes >= 2, got "
                       f"{self.inference_steps}, {self.num_classes}")
    core.check_block(self.block, TIME_CONDITIONED, NAME)

  @property
  def dim(self) -> int:
    return self.num_classes


def optimizer(optim: Optim):
  """AdamW after clipping by the global norm, as for the backprop baseline."""
  return core.adamw(optim)


@partial(jax.jit, static_argnames=("model", "optim"))  # eager flax init is ~10x slower
def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed: jax.Array | None = None) -> State:
  if embed is not None:
    raise ValueError("the adjoint baseline uses the fixed one-hot embedding")
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z = jnp.zeros((1, model.dim), jnp.float32)
  block = core.init_block(model.block, jax.random.fold_in(key, 0), x, z, jnp.zeros((1,)))["params"]
  params = {"block": block, "head": core.readout_head(jnp.eye(model.num_classes, dtype=jnp.float32)),
            "log_rate": jnp.asarray(LOG_RATE_INIT, jnp.float32)}
  return {"step": jnp.zeros((), jnp.int32), "rng": core.new_rng(key), "params": params,
          "opt": optimizer(optim).init(params)}


def num_block_params(state: State) -> int:
  return core.count_params(state["params"]["block"])


def drift(model: Model):
  """f(t, z, (block params, features, log beta)) = beta (softmax(block) @ W_embed - z)."""

  def f(t, z, args):
    block, h, log_rate = args
    logits = core.from_features(model.block, {"params": block}, h, z, t)
    return jnp.exp(log_rate) * (jax.nn.softmax(logits) - z)  # W_embed = I

  return f


def logits(model: Model, params: dict, x: jax.Array, z0: jax.Array, key: jax.Array | None = None,
           solve=solvers.euler_adjoint) -> jax.Array:
  """Class logits after integrating from z_0 over [0, 1]; training mode when `key` is given.
  `solve`: the adjoint Euler solver, or any solver of the same signature (e.g. `solvers.euler`
  to back-propagate through the solve)."""
  if key is None:
    h = core.features(model.block, {"params": params["block"]}, x)
  elif core.has_split(model.block):
    h = core.apply(model.block, {"params": params["block"]}, x, train=True, rng=key,
                   method="features")[0]
  else:
    h = x
  z1 = solve(drift(model), z0, 0.0, 1.0, model.inference_steps,
             (params["block"], h, params["log_rate"]))
  return core.head_logits(params["head"], z1)


def loss(model: Model, params: dict, x: jax.Array, y: jax.Array, key: jax.Array,
         solve=solvers.euler_adjoint):
  """Cross-entropy from z_0 ~ N(0, I). Returns (loss, metrics)."""
  core.check_batch(model, x, y)
  x = core.to_float(x)
  k0, k_drop = jax.random.split(key)
  z0 = jax.random.normal(k0, (x.shape[0], model.dim))
  out = logits(model, params, x, z0, k_drop, solve)
  ce = core.cross_entropy(out, y)
  acc = jnp.mean(jnp.argmax(out, -1) == y)
  return ce, {"ce": ce, "accuracy": acc, "block_accuracy": acc}


def train_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
               y: jax.Array) -> tuple[State, Metrics]:
  """One AdamW step on one batch, the gradient from the adjoint ODE (dropped whole where
  `core.update_ok` fails: metrics['skipped'])."""
  core.check_batch(model, x, y)

  def objective(params, state, x, y, key):
    value, metrics = loss(model, params, x, y, key)
    return value, (metrics, {})

  state, value, m = core.gradient_step(objective, optimizer(optim), state, x, y,
                                        model.num_classes)
  return state, {"loss": value, "rate": jnp.exp(state["params"]["log_rate"]), **m}


def make_train_step(model: Model, optim: Optim = Optim(), compute: Compute = Compute()):
  """`step(state, x, y) -> (state, metrics)`: checks the batch (shapes, dtypes and values:
  one small host sync per call) and runs `step.jitted`, the jitted `train_step` that donates
  `state`. Call `step.jitted` to skip the checks and the sync."""
  return core.jit_step(train_step, model, optim, compute.resolve(1))


def predict(model: Model, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str = "mean") -> jax.Array:
  """Class logits [B, m]. mode 'mean': z_0 = 0; 'stochastic': z_0 ~ N(0, I), needs `key`."""
  core.check_predict(model, x, mode, key)
  return _predict(model, state, x, key, mode)


@partial(jax.jit, static_argnames=("model", "mode"))
def _predict(model, state, x, key, mode):
  z0 = core.inference_noise(mode, (x.shape[0], model.dim), key)
  return logits(model, state["params"], core.to_float(x), z0, solve=solvers.euler)


def eval_counts(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array,
                key: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with z_0 = 0, [runs] correct with z_0 ~ N(0, I)) on one batch; the features
  are computed once and all paths integrated together."""
  core.check_batch(model, x, y, padding=True)
  params = state["params"]
  solve = lambda h, z0: solvers.euler(drift(model), z0, 0.0, 1.0, model.inference_steps,
                                      (params["block"], h, params["log_rate"]))
  h = core.features(model.block, {"params": params["block"]}, core.to_float(x))
  return core.eval_paths(solve, partial(core.head_logits, params["head"]), h, y, key, runs,
                         model.dim)


def block_calls(model: Model) -> int:
  """Block calls to classify one batch: the block at every Euler step."""
  return model.inference_steps


def describe(model: Model, compute: Compute, state: State) -> str:
  return (f"one time-conditioned block of {num_block_params(state):,} parameters, "
          f"{model.inference_steps} Euler steps in training (adjoint method) and inference")


# Its solver steps are part of training (the adjoint integrates through them), so
# inference_steps may not change on resume, unlike CT's and FM's.
METHOD = Method(
    name="adjoint", title=NAME, Model=Model, init=init, train_step=train_step,
    eval_counts=eval_counts, predict=predict, num_block_params=num_block_params,
    block_calls=block_calls, describe=describe, time_conditioned=TIME_CONDITIONED,
    epochs=budgets(digits=2, mnist=2, cifar10=4, cifar100=4),
    metrics=("ce", "accuracy", "block_accuracy", "rate"))
