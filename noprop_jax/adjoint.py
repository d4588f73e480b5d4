"""The adjoint baseline: a neural ODE with NoProp-CT's block, trained by the adjoint method.

  dz/dt = beta (softmax(f(x, z, t)) @ W_embed - z),  t in [0, 1],  z(0) = z_0 ~ N(0, I),
  p(y | x) = softmax(W_out z(1) + b_out),

with f the continuous-time block, W_embed the fixed one-hot embedding and a
linear classifier, trained end to end on cross-entropy with AdamW. (The paper
gives the block, the fixed embedding and the classifier; the drift is the
continuous-time limit of the backprop baseline's z_t = (1 - a) z_{t-1} + a u_hat, and
its learned rate beta = exp(log_rate) that of the learned a_t: it starts at 6.2, the
decay of z_0 through ten backprop blocks at a = tanh(0.5). With beta = 1, e^-1 of the
initial noise reached the classifier: 97.4% from z_0 = 0 but 57% from sampled z_0.)

The gradient does not back-propagate through the solver: `solvers.euler_adjoint`
solves the adjoint ODE backwards (Chen et al., 2018), so training memory does
not grow with the number of Euler steps (`cfg.inference_steps`, 1000 by default
in training and inference, as in the paper). The image pathway runs once per
image, outside the solver, and its gradient arrives through the adjoint's
cotangent for the image term.

State: {'step', 'params': {'block', 'head', 'log_rate'}, 'opt'}.
"""

import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from noprop_jax import backprop, continuous, dt, solvers
from noprop_jax.config import Config
from noprop_jax.models import CTBlock, count_params

State = dict[str, Any]
Metrics = dict[str, jax.Array]


# AdamW after clipping by the global norm (paper Table 4), as for the backprop baseline.
optimizer = dt.optimizer


@partial(jax.jit, static_argnums=0)  # eager, flax init dispatches op by op: ~10x slower
def init(cfg: Config, key: jax.Array, embed: jax.Array | None = None) -> State:
  if embed is not None or cfg.embedding != "onehot":
    raise ValueError("the adjoint baseline uses the fixed one-hot embedding")
  x = jnp.zeros((1, *cfg.image_shape), jnp.float32)
  z = jnp.zeros((1, cfg.embedding_dim), jnp.float32)
  block = continuous.make_model(cfg).init({"params": key}, x, z, jnp.zeros((1,)),
                                          train=False)["params"]
  params = {"block": block, "head": backprop.init_head(jnp.eye(cfg.num_classes, dtype=jnp.float32)),
            "log_rate": jnp.asarray(LOG_RATE_INIT, jnp.float32)}
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": optimizer(cfg).init(params)}


# beta's initial value: z_0's decay through T = 10 backprop blocks at alpha = tanh(W_INIT),
# (1 - alpha)^10 = exp(-beta).
LOG_RATE_INIT = math.log(-10.0 * math.log1p(-math.tanh(backprop.W_INIT)))


def params_per_block(state: State) -> int:
  return count_params(state["params"]["block"])


def drift(cfg: Config) -> Callable:
  """f(t, z, (block params, image term, log beta)) = beta (softmax(block) @ W_embed - z)."""
  model = continuous.make_model(cfg)
  W = jnp.eye(cfg.num_classes, dtype=jnp.float32)

  def f(t, z, args):
    block, img, log_rate = args
    logits = model.apply({"params": block}, img, z, t, method=CTBlock.logits_from_image_term)
    return jnp.exp(log_rate) * (jax.nn.softmax(logits) @ W - z)

  return f


def logits(cfg: Config, params, x: jax.Array, z0: jax.Array, train: bool,
           key: jax.Array | None = None, adjoint: bool = True) -> jax.Array:
  """Class logits after integrating from z_0 over [0, 1] in cfg.inference_steps Euler steps.

  `adjoint=False` back-propagates through the forward solve instead (for tests
  and the memory benchmark: same values, memory growing with the steps).
  """
  rngs = {"dropout": key} if train else None
  img = continuous.make_model(cfg).apply({"params": params["block"]}, x, train,
                                         method=CTBlock.image_term, rngs=rngs)
  solve = solvers.euler_adjoint if adjoint else solvers.euler
  z1 = solve(drift(cfg), z0, 0.0, 1.0, cfg.inference_steps,
             (params["block"], img, params["log_rate"]))
  return backprop.head_logits(params, z1)


def loss_fn(cfg: Config, params, x, y, key, adjoint: bool = True):
  k0, k_drop = jax.random.split(key)
  z0 = jax.random.normal(k0, (x.shape[0], cfg.embedding_dim))
  out = logits(cfg, params, x, z0, True, k_drop, adjoint)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
  acc = jnp.mean(jnp.argmax(out, -1) == y)
  return ce, {"ce": ce, "accuracy": acc, "block_accuracy": acc}


def train_step(cfg: Config, state: State, x: jax.Array, y: jax.Array,
               adjoint: bool = True) -> tuple[State, Metrics]:
  """One AdamW step on one batch, the gradient from the adjoint ODE."""
  x = dt.to_float(x)
  (loss, m), g = jax.value_and_grad(partial(loss_fn, cfg, adjoint=adjoint), has_aux=True)(
      state["params"], x, y, dt.step_key(cfg, state["step"]))
  upd, opt = optimizer(cfg).update(g, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], upd)
  return ({"step": state["step"] + 1, "params": params, "opt": opt},
          {"loss": loss, "rate": jnp.exp(params["log_rate"]), **m})


def make_train_step(cfg: Config) -> Callable[[State, jax.Array, jax.Array], tuple[State, Metrics]]:
  """Jitted `(state, x, y) -> (state, metrics)`; donates `state`."""
  return jax.jit(partial(train_step, cfg), donate_argnums=0)


@partial(jax.jit, static_argnames=("cfg", "mode"))
def predict(cfg: Config, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str | None = None) -> jax.Array:
  """Class logits for images x. mode 'mean' (default): z_0 = 0; 'stochastic':
  z_0 ~ N(0, I), needs `key`."""
  dt.check_images(x, cfg)
  z0 = backprop.initial_z(cfg, x.shape[0], key, mode)
  return logits(cfg, state["params"], dt.to_float(x), z0, False)


def eval_counts(cfg: Config, state: State, x: jax.Array, y: jax.Array, key: jax.Array,
                runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with z_0 = 0, [runs] correct with z_0 ~ N(0, I)) on one batch. The image
  term is computed once; all runs are integrated together. Labels -1 never count."""
  B, d = y.shape[0], cfg.embedding_dim
  params = state["params"]
  img = continuous.make_model(cfg).apply({"params": params["block"]}, dt.to_float(x),
                                         method=CTBlock.image_term)
  z0 = jnp.concatenate([jnp.zeros((B, d)), jax.random.normal(key, (runs * B, d))])
  img = jnp.broadcast_to(img[None], (1 + runs, *img.shape)).reshape(-1, img.shape[-1])
  z1 = solvers.euler(drift(cfg), z0, 0.0, 1.0, cfg.inference_steps,
                     (params["block"], img, params["log_rate"]))
  out = backprop.head_logits(params, z1)
  correct = (jnp.argmax(out, -1).reshape(1 + runs, B) == y[None, :]).sum(-1)
  return correct[0], correct[1:]
