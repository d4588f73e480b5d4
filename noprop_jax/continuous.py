"""NoProp-CT and NoProp-FM as pure functions: init, losses, training step, inference.

One time-conditioned block (`CTBlock`) serves every t in [0, 1]; t = 0 is noise,
t = 1 the label. Both losses sample one t ~ U[0, 1] per example, so a step
trains the block at B points of its time axis with no pass through the chain.

  CT (Eq. 9, Algorithm 2): z_t ~ N(sqrt(alpha_bar(t)) u_y, (1 - alpha_bar(t)) I)
    with a learned schedule; loss = CE(head(z_1), y) + KL(q(z_0|y) || N(0, I))
    + (eta / 2) SNR'(t) ||softmax(f(x, z_t, t)) @ W - u_y||^2.
  FM (Eq. 10-13): z_t = t u_y + (1 - t) z_0 + sigma eps, z_0 ~ N(0, I);
    loss = ||f(x, z_t, t) @ W - (u_y - z_0)||^2, plus, when W is learned,
    the anchor CE(head(z_t + (1 - t) v), y).

State is a plain pytree:
  step    int32 scalar
  params  {'block', 'head' (CT; FM with a learned embedding), 'embed' (learned),
           'schedule' (CT: the monotone network and the endpoints gamma_0, gamma_1)}
  opt     optimizer state of `params`

Inference integrates from t = 0 to 1 with the solvers of `solvers.py`; the
block's image pathway runs once per image, outside the solver loop.
"""

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from noprop_jax import dt, solvers
from noprop_jax.config import Config
from noprop_jax.dt import check_images, embedding_matrix, initial_embedding, to_float
from noprop_jax.models import CTBlock, count_params
from noprop_jax.schedule import LearnedSchedule, ScheduleValues, schedule_values

State = dict[str, Any]
Metrics = dict[str, jax.Array]


def make_model(cfg: Config) -> CTBlock:
  proto = cfg.image_shape if cfg.embedding == "prototype" else None
  return CTBlock(cfg.num_classes, cfg.info.padding, cfg.dropout, cfg.resolved_conv_impl(),
                 prototype_shape=proto)


def make_schedule(cfg: Config) -> LearnedSchedule:
  return LearnedSchedule(cfg.gamma_0_init, cfg.gamma_1_init)


def has_head(cfg: Config) -> bool:
  """CT always reads the class off z_1 with a linear head; FM only needs one for its
  anchor loss (learned embedding) and otherwise predicts the nearest embedding."""
  return cfg.method == "ct" or cfg.embedding != "onehot"


def _clip_per_group(max_norm: float) -> optax.GradientTransformation:
  """Clip each top-level group (block, head, embed, schedule) by its own norm, so a
  large denoising gradient does not shrink the head's or the schedule's step."""

  def update(updates, state, params=None):
    def clip(tree):
      norm = optax.global_norm(tree)
      return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30)), tree)

    return {k: clip(v) for k, v in updates.items()}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(cfg: Config) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (paper Table 4: Adam, 1e-3;
  PyTorch's `Adam(weight_decay=...)`). The schedule is not decayed: pulling its
  endpoints towards 0 would shrink the SNR range rather than regularise."""
  decay_mask = lambda params: {k: jax.tree.map(lambda _: k != "schedule", v)
                               for k, v in params.items()}
  parts = [_clip_per_group(cfg.grad_clip)] if cfg.grad_clip else []
  if cfg.weight_decay:
    parts.append(optax.masked(optax.add_decayed_weights(cfg.weight_decay), decay_mask))
  return optax.chain(*parts, optax.scale_by_adam(), optax.scale(-cfg.lr))


@partial(jax.jit, static_argnums=0)  # eager, flax init dispatches op by op: ~10x slower
def init(cfg: Config, key: jax.Array, embed: jax.Array | None = None) -> State:
  """Block, head (where there is one), embedding, schedule (CT) and optimizer state.

  `embed`: the initial prototype embedding [m, H*W*C] (embedding 'prototype' only).
  """
  k_block, k_embed, k_sched = jax.random.split(key, 3)
  x = jnp.zeros((1, *cfg.image_shape), jnp.float32)
  z = jnp.zeros((1, cfg.embedding_dim), jnp.float32)
  params = {"block": make_model(cfg).init({"params": k_block}, x, z, jnp.zeros((1,)),
                                          train=False)["params"]}
  d, m = cfg.embedding_dim, cfg.num_classes
  if has_head(cfg):  # zero init, as for DT: softmax regression from zero is quick to fit
    params["head"] = {"kernel": jnp.zeros((d, m), jnp.float32), "bias": jnp.zeros((m,), jnp.float32)}
  W = initial_embedding(cfg, k_embed, embed)
  if W is not None:
    params["embed"] = W
  if cfg.method == "ct":
    params["schedule"] = make_schedule(cfg).init(k_sched, jnp.zeros((1,)))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt": optimizer(cfg).init(params)}


def params_per_block(state: State) -> int:
  return count_params(state["params"]["block"])


def _head(params, z: jax.Array) -> jax.Array:
  return z @ params["head"]["kernel"] + params["head"]["bias"][None, :]


def schedule_at(cfg: Config, params, t: jax.Array) -> ScheduleValues:
  """gamma, alpha_bar, SNR and SNR' (exact, by forward-mode autodiff) at times t."""
  return schedule_values(make_schedule(cfg), params["schedule"], t)


# ----------------------------------------------------------------------------- losses

def ct_marginal_sample(u: jax.Array, s: ScheduleValues, key: jax.Array) -> jax.Array:
  """z_t ~ q(z_t | y) = N(sqrt(alpha_bar(t)) u_y, (1 - alpha_bar(t)) I), one t per row."""
  eps = jax.random.normal(key, u.shape)
  return jnp.sqrt(s.alpha_bar)[:, None] * u + jnp.sqrt(s.one_minus_alpha_bar)[:, None] * eps


def ct_loss(cfg: Config, params, x: jax.Array, y: jax.Array, key: jax.Array):
  """Eq. 9 on one batch, t ~ U[0, 1] per example. Returns (loss, metrics)."""
  k_t, k_eps, k_1, k_drop = jax.random.split(key, 4)
  W = embedding_matrix(params, cfg)
  u = W[y]
  B = y.shape[0]
  t = jax.random.uniform(k_t, (B,))
  s = schedule_at(cfg, params, t)
  z = ct_marginal_sample(u, s, k_eps)
  logits, _ = dt.apply_train(cfg, make_model(cfg), params["block"], None, x, z, t, rng=k_drop)
  sq = jnp.sum((jax.nn.softmax(logits) @ W - u) ** 2, axis=-1)
  denoise = 0.5 * cfg.eta * jnp.mean(s.snr_prime * sq)
  # The endpoints are the parameters themselves: gamma(0) = gamma_1, gamma(1) = gamma_0.
  g0, g1 = params["schedule"]["gamma_0"], params["schedule"]["gamma_1"]
  z1 = jnp.sqrt(jax.nn.sigmoid(-g0)) * u + jnp.sqrt(jax.nn.sigmoid(g0)) * jax.random.normal(k_1, u.shape)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_head(params, z1), y))
  ab0 = jax.nn.sigmoid(-g1)  # alpha_bar(0); log(1 - alpha_bar(0)) = log sigmoid(gamma_1)
  kl = 0.5 * jnp.mean(jnp.sum(ab0 * u**2 - ab0 - jax.nn.log_sigmoid(g1), axis=-1))
  metrics = {"denoise": denoise, "ce": ce, "kl": kl, "mse": jnp.mean(sq),
             "block_accuracy": jnp.mean(jnp.argmax(logits, -1) == y), "gamma_0": g0, "gamma_1": g1}
  return ce + kl + denoise, metrics


def fm_path(u: jax.Array, z0: jax.Array, t: jax.Array, sigma: float, eps: jax.Array):
  """Eq. 10: z_t = t u + (1 - t) z_0 + sigma eps, and the target velocity u - z_0."""
  tt = t[:, None]
  return tt * u + (1.0 - tt) * z0 + sigma * eps, u - z0


def fm_loss(cfg: Config, params, x: jax.Array, y: jax.Array, key: jax.Array):
  """Eq. 11/13 on one batch, t ~ U[0, 1] per example. Returns (loss, metrics)."""
  k_t, k_0, k_eps, k_drop = jax.random.split(key, 4)
  W = embedding_matrix(params, cfg)
  u = W[y]
  t = jax.random.uniform(k_t, (y.shape[0],))
  z0 = jax.random.normal(k_0, u.shape)
  z, target = fm_path(u, z0, t, cfg.fm_sigma, jax.random.normal(k_eps, u.shape))
  logits, _ = dt.apply_train(cfg, make_model(cfg), params["block"], None, x, z, t, rng=k_drop)
  v = logits @ W
  fm = jnp.mean(jnp.sum((v - target) ** 2, axis=-1))
  z1_hat = z + (1.0 - t)[:, None] * v  # one Euler step to t = 1
  nearest = jnp.argmin(_sq_dist(z1_hat, W), -1)
  metrics = {"fm": fm, "block_accuracy": jnp.mean(nearest == y)}
  if not has_head(cfg):
    return fm, metrics
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_head(params, z1_hat), y))
  return fm + ce, {**metrics, "ce": ce}


def loss_fn(cfg: Config) -> Callable:
  return partial(ct_loss if cfg.method == "ct" else fm_loss, cfg)


# ----------------------------------------------------------------------------- training step

def train_step(cfg: Config, state: State, x: jax.Array, y: jax.Array) -> tuple[State, Metrics]:
  """One Adam step of the block, head, embedding and schedule on one batch."""
  x = to_float(x)
  (loss, m), g = jax.value_and_grad(loss_fn(cfg), has_aux=True)(
      state["params"], x, y, dt.step_key(cfg, state["step"]))
  upd, opt = optimizer(cfg).update(g, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], upd)
  if "schedule" in params:  # log the endpoints the step leaves, not the ones it started from
    m = {**m, "gamma_0": params["schedule"]["gamma_0"], "gamma_1": params["schedule"]["gamma_1"]}
  return {"step": state["step"] + 1, "params": params, "opt": opt}, {"loss": loss, **m}


def make_train_step(cfg: Config) -> Callable[[State, jax.Array, jax.Array], tuple[State, Metrics]]:
  """Jitted `(state, x, y) -> (state, metrics)`; donates `state`."""
  return jax.jit(partial(train_step, cfg), donate_argnums=0)


# ----------------------------------------------------------------------------- inference

def _sq_dist(z_ND: jax.Array, W_MD: jax.Array) -> jax.Array:
  return jnp.sum((z_ND[:, None, :] - W_MD[None, :, :]) ** 2, axis=-1)


def image_term(cfg: Config, state: State, x: jax.Array) -> jax.Array:
  """The block's z- and t-independent part for images x: [B, 256], computed once."""
  return make_model(cfg).apply({"params": state["params"]["block"]}, to_float(x),
                               method=CTBlock.image_term)


def _block_out(cfg: Config, params, logits: jax.Array) -> jax.Array:
  W = embedding_matrix(params, cfg)
  return (jax.nn.softmax(logits) if cfg.method == "ct" else logits) @ W


IMPLS = ("hoisted", "naive", "per_step")


def vector_field(cfg: Config, state: State, impl: str = "hoisted") -> Callable:
  """f(t, z, args) for the solvers; t is a scalar, z [N, d].

  impl 'hoisted': args is `image_term` of the N images ([N, 256]) and each step
  runs only the small fused head. 'naive': args are the images and each step
  calls the whole block, as a straightforward implementation would (under jit,
  XLA may still hoist the loop-invariant conv tower out of the solver loop by
  itself). 'per_step': the same, with the images passed through an
  optimization barrier together with t, so the whole block really runs at
  every step (what an eager framework does). CT returns the probability-flow
  ODE's drift, FM the learned velocity.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown inference impl {impl!r}; choose one of {list(IMPLS)}")
  params, model = state["params"], make_model(cfg)

  def u_hat(t, z, args):
    if impl == "hoisted":
      logits = model.apply({"params": params["block"]}, args, z, t,
                           method=CTBlock.logits_from_image_term)
    else:
      if impl == "per_step":
        args, t = jax.lax.optimization_barrier((args, t))
      logits = model.apply({"params": params["block"]}, args, z, t, train=False)
    return _block_out(cfg, params, logits)

  if cfg.method == "fm":
    return u_hat

  def pf_ode(t, z, args):
    s = schedule_at(cfg, params, t)
    return (-0.5 * s.gamma_prime) * (jnp.sqrt(s.alpha_bar) * u_hat(t, z, args) - s.alpha_bar * z)

  return pf_ode


def reverse_sde(cfg: Config, state: State) -> tuple[Callable, Callable]:
  """(drift, diffusion) of NoProp-CT's reverse-time SDE, hoisted.

  With beta(t) = d log alpha_bar / dt = -gamma'(t) (1 - alpha_bar(t)) and the
  score -(z - sqrt(alpha_bar) u_hat) / (1 - alpha_bar):
  dz = -gamma' (sqrt(alpha_bar) u_hat - (1 + alpha_bar) / 2 z) dt + sqrt(beta) dW.
  """
  params, model = state["params"], make_model(cfg)

  def drift(t, z, img):
    s = schedule_at(cfg, params, t)
    logits = model.apply({"params": params["block"]}, img, z, t, method=CTBlock.logits_from_image_term)
    u = _block_out(cfg, params, logits)
    return -s.gamma_prime * (jnp.sqrt(s.alpha_bar) * u - 0.5 * (1.0 + s.alpha_bar) * z)

  def diffusion(t, z, img):
    s = schedule_at(cfg, params, t)
    return jnp.sqrt(-s.gamma_prime * s.one_minus_alpha_bar)

  return drift, diffusion


def class_scores(cfg: Config, state: State, z1: jax.Array) -> jax.Array:
  """Scores whose argmax is the prediction from z_1: CT's head logits; FM's
  negative squared distance to each class embedding (the nearest wins)."""
  params = state["params"]
  if cfg.method == "ct":
    return _head(params, z1)
  return -_sq_dist(z1, embedding_matrix(params, cfg))


def integrate(cfg: Config, state: State, args: jax.Array, z0: jax.Array, steps: int,
              key: jax.Array | None = None, impl: str = "hoisted") -> jax.Array:
  """z_1 from z_0 over t in [0, 1] in `steps` Euler steps. With `key` and CT's
  'sde' sampler: Euler-Maruyama on the reverse SDE; otherwise Euler on the ODE."""
  if key is not None and cfg.method == "ct" and cfg.ct_sampler == "sde":
    if impl != "hoisted":
      raise ValueError("the SDE sampler is implemented for hoisted inference only")
    drift, diffusion = reverse_sde(cfg, state)
    return solvers.euler_maruyama(drift, diffusion, z0, 0.0, 1.0, steps, key, args)
  return solvers.euler(vector_field(cfg, state, impl), z0, 0.0, 1.0, steps, args)


@partial(jax.jit, static_argnames=("cfg", "mode", "steps", "impl"))
def predict(cfg: Config, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str | None = None, steps: int | None = None, impl: str = "hoisted") -> jax.Array:
  """Class scores for images x [B, H, W, C] (argmax is the prediction).

  mode 'mean' (default): z_0 = E[z_0] = 0 and the deterministic solver;
  'stochastic': z_0 ~ N(0, I) (and the SDE's noise with CT's 'sde' sampler);
  needs `key`. steps defaults to cfg.inference_steps. impl 'naive' or
  'per_step' evaluate the whole block at every step (see `vector_field`; for
  benchmarks and tests: same result, slower).
  """
  check_images(x, cfg)
  mode, steps = mode or cfg.inference, steps or cfg.inference_steps
  shape = (x.shape[0], cfg.embedding_dim)
  args = image_term(cfg, state, x) if impl == "hoisted" else to_float(x)
  if mode == "mean":
    z1 = integrate(cfg, state, args, jnp.zeros(shape), steps, impl=impl)
  elif mode == "stochastic":
    if key is None:
      raise ValueError("stochastic inference needs a PRNG key")
    k0, k1 = jax.random.split(key)
    z1 = integrate(cfg, state, args, jax.random.normal(k0, shape), steps, k1, impl)
  else:
    raise ValueError(f"unknown inference mode {mode!r}; choose 'mean' or 'stochastic'")
  return class_scores(cfg, state, z1)


def eval_counts(cfg: Config, state: State, x: jax.Array, y: jax.Array, key: jax.Array,
                runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct with the mean path, [runs] correct with sampling) on one batch.

  The image term is computed once; the mean path and all sampled runs are
  integrated together as one [(1 + runs) * B, d] state (one matmul per layer
  and step). Labels of -1 (padding) never count.
  """
  B, d = y.shape[0], cfg.embedding_dim
  img = image_term(cfg, state, x)
  k0, k1 = jax.random.split(key)
  z0 = jnp.concatenate([jnp.zeros((1, B, d)), jax.random.normal(k0, (runs, B, d))])
  tile = lambda a, n: jnp.tile(a, (n, 1))
  correct = lambda z1, n: jnp.sum(
      (jnp.argmax(class_scores(cfg, state, z1), -1) == jnp.tile(y, n)).reshape(n, B), axis=1)
  if cfg.method == "ct" and cfg.ct_sampler == "sde" and runs:
    z_mean = integrate(cfg, state, img, z0[0], cfg.inference_steps)
    z_s = integrate(cfg, state, tile(img, runs), z0[1:].reshape(runs * B, d), cfg.inference_steps, k1)
    return correct(z_mean, 1)[0], correct(z_s, runs)
  z1 = integrate(cfg, state, tile(img, runs + 1), z0.reshape((runs + 1) * B, d), cfg.inference_steps)
  c = correct(z1, runs + 1)
  return c[0], c[1:]
