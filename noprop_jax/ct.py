"""NoProp-CT: one time-conditioned block denoising z_t for every t in [0, 1], with a
learned noise schedule (Eq. 9, Algorithm 2). t = 0 is noise, t = 1 the label.

  model = ct.Model(block, input_shape=(64,), num_classes=10)   # any (x, z, t) -> logits block
  state = ct.init(model, jax.random.key(0))
  step = ct.make_train_step(model)
  state, metrics = step(state, x, y)
  scores = ct.predict(model, state, x_test)                    # probability-flow ODE, Euler

State: {'step', 'rng', 'params': {'block', 'head', 'embed' (unless one-hot),
'schedule' (the monotone network and the endpoints gamma_0, gamma_1)}, 'opt'}.
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from noprop_jax import core, solvers
from noprop_jax.core import Compute, Metrics, Optim, State
from noprop_jax.method import Method, budgets
from noprop_jax.schedule import LearnedSchedule, ScheduleValues, schedule_values
from noprop_jax.setting import setting

NAME = "NoProp-CT"
SAMPLERS = ("ode", "sde")
STACKED = ()
TIME_CONDITIONED = True  # blocks are (x, z, t) -> logits


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z, t) -> logits [B, num_classes]; see `core` for the protocol
  input_shape: tuple[int, ...]  # one input's shape
  num_classes: int  # m
  eta: float = setting(1.0, "weight of the denoising term (paper Table 4)")
  embedding: str = setting("onehot", "class embedding: onehot | learned | prototype")
  embedding_dim: int = setting(0, "d; 0: m (onehot), the input size (prototype), 20 (learned)")
  # Initial endpoints (both train): -3.5 / 3.5 put alpha_bar in [0.029, 0.971], about the
  # span of the discrete blocks' inputs, and keep the SNR' weights within ~2 orders of magnitude.
  gamma_0_init: float = setting(-3.5, "initial gamma(1), the label end")
  gamma_1_init: float = setting(3.5, "initial gamma(0), the noise end")
  inference_steps: int = setting(1000, "Euler steps from t = 0 to 1 at inference (paper: 1000)")
  ct_sampler: str = setting(
      "ode", "sampled runs: probability-flow ODE | reverse SDE (Euler-Maruyama)")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    core.check_choice("ct_sampler", self.ct_sampler, SAMPLERS)
    core.check_positive("eta", self.eta)
    if self.inference_steps < 1 or self.num_classes < 2:
      raise ValueError(f"need inference_steps >= 1 and num_classes >= 2, got "
                       f"{self.inference_steps}, {self.num_classes}")
    if not self.gamma_1_init > self.gamma_0_init:
      raise ValueError("the schedule needs gamma_1_init > gamma_0_init (gamma decreases from the "
                       f"noise end t = 0 to the label end t = 1), got {self.gamma_0_init}, "
                       f"{self.gamma_1_init}")
    self.dim  # validates the embedding
    core.check_block(self.block, TIME_CONDITIONED, NAME)

  dim = property(core.model_dim)  # d, the embedding's dimension

  @property
  def schedule(self) -> LearnedSchedule:
    return LearnedSchedule(self.gamma_0_init, self.gamma_1_init)


def optimizer(optim: Optim):
  """Adam with L2 decay (paper Table 4), each group clipped by its own norm. The schedule
  is not decayed: pulling its endpoints to 0 would shrink the SNR range, not regularise."""
  return core.adam_l2(optim, no_decay=("schedule",))


@partial(jax.jit, static_argnames=("model", "optim"))  # eager flax init is ~10x slower
def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed: jax.Array | None = None) -> State:
  """Block, zero head, embedding (`embed`: prototype rows), schedule, optimizer state."""
  k_block, k_embed, k_sched = jax.random.split(jax.random.fold_in(key, 0), 3)
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z = jnp.zeros((1, model.dim), jnp.float32)
  params = {"block": core.init_block(model.block, k_block, x, z, jnp.zeros((1,)))["params"],
            "head": core.zero_head(model.dim, model.num_classes),
            "schedule": model.schedule.init(k_sched, jnp.zeros((1,)))["params"]}
  W = core.init_embedding(model.embedding, k_embed, model.num_classes, model.dim, embed)
  if W is not None:
    params["embed"] = W
  return {"step": jnp.zeros((), jnp.int32), "rng": core.new_rng(key), "params": params,
          "opt": optimizer(optim).init(params)}


def num_block_params(state: State) -> int:
  return core.count_params(state["params"]["block"])


def schedule_at(model: Model, params: dict, t: jax.Array) -> ScheduleValues:
  """gamma, alpha_bar, SNR and SNR' (exact, by forward-mode autodiff) at times t."""
  return schedule_values(model.schedule, params["schedule"], t)


# ----------------------------------------------------------------------------- the objective

def loss(model: Model, params: dict, x: jax.Array, y: jax.Array, key: jax.Array,
         precision: str = "float32") -> tuple[jax.Array, Metrics]:
  """NoProp-CT's objective (Eq. 9) on one batch, one t ~ U[0, 1] per example:

    L = E_q[-log p(y | z_1)] + KL(q(z_0 | y) || N(0, I))
        + (eta / 2) E_{t ~ U[0, 1]} [SNR'(t) ||u_hat(z_t, x, t) - u_y||^2],

  with z_t ~ N(sqrt(alpha_bar(t)) u_y, (1 - alpha_bar(t)) I) and
  u_hat = softmax(block(x, z_t, t)) @ W_embed.
  """
  core.check_batch(model, x, y)
  x = core.to_float(x)
  k_t, k_eps, k_1, k_drop = jax.random.split(key, 4)
  W = core.embedding_matrix(params, model.num_classes)
  u = core.label_rows(W, y)
  # The denoising term, at one t per example.
  t = jax.random.uniform(k_t, (y.shape[0],))
  s = schedule_at(model, params, t)
  z_t = core.noisy(u, s.alpha_bar[:, None], s.one_minus_alpha_bar[:, None], k_eps)
  logits, _ = core.apply(model.block, {"params": params["block"]}, x, z_t, t, train=True,
                         rng=k_drop, precision=precision)
  sq = jnp.sum((jax.nn.softmax(logits) @ W - u) ** 2, axis=-1)
  denoise = 0.5 * model.eta * jnp.mean(s.snr_prime * sq)
  # The endpoints are parameters themselves: gamma(1) = gamma_0, gamma(0) = gamma_1.
  g0, g1 = params["schedule"]["gamma_0"], params["schedule"]["gamma_1"]
  z_1 = core.noisy(u, jax.nn.sigmoid(-g0), jax.nn.sigmoid(g0), k_1)
  ce = core.cross_entropy(core.head_logits(params["head"], z_1), y)
  # alpha_bar(0) = sigmoid(-gamma_1); log(1 - alpha_bar(0)) = log sigmoid(gamma_1).
  kl = core.gaussian_kl(u, jax.nn.sigmoid(-g1), jax.nn.log_sigmoid(g1))
  return ce + kl + denoise, {"denoise": denoise, "ce": ce, "kl": kl, "mse": jnp.mean(sq),
                             "block_accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def train_step(model: Model, optim: Optim, compute: Compute, state: State, x: jax.Array,
               y: jax.Array) -> tuple[State, Metrics]:
  """One Adam step of the block, head, embedding and schedule on one batch (dropped whole
  where `core.update_ok` fails: metrics['skipped'])."""
  core.check_batch(model, x, y)

  def objective(params, state, x, y, key):
    value, metrics = loss(model, params, x, y, key, compute.precision)
    return value, (metrics, {})

  state, value, m = core.gradient_step(objective, optimizer(optim), state, x, y,
                                        model.num_classes)
  sched = state["params"]["schedule"]  # the endpoints the step leaves
  return state, {"loss": value, **m, "gamma_0": sched["gamma_0"], "gamma_1": sched["gamma_1"]}


def summary(model: Model, state: State) -> dict:
  """The learned schedule's endpoints at the end of the run, for summary.json."""
  sched = jax.device_get(state["params"]["schedule"])
  return {"gamma_0": float(sched["gamma_0"]), "gamma_1": float(sched["gamma_1"])}


def make_train_step(model: Model, optim: Optim = Optim(), compute: Compute = Compute()):
  """`step(state, x, y) -> (state, metrics)`: checks the batch (shapes, dtypes and values:
  one small host sync per call) and runs `step.jitted`, the jitted `train_step` that donates
  `state`. Call `step.jitted` to skip the checks and the sync."""
  return core.jit_step(train_step, model, optim, compute.resolve(1))


# ----------------------------------------------------------------------------- inference

def _u_hat(model: Model, params: dict, h, z, t):
  W = core.embedding_matrix(params, model.num_classes)
  return jax.nn.softmax(core.from_features(model.block, {"params": params["block"]}, h, z, t)) @ W


def probability_flow(model: Model, params: dict):
  """dz/dt = -gamma'(t) / 2 (sqrt(alpha_bar) u_hat - alpha_bar z): moves samples along the
  training marginals q(z_t | y), deterministically; args are the inputs' `features`."""

  def f(t, z, h):
    s = schedule_at(model, params, t)
    return (-0.5 * s.gamma_prime) * (jnp.sqrt(s.alpha_bar) * _u_hat(model, params, h, z, t)
                                     - s.alpha_bar * z)

  return f


def reverse_sde(model: Model, params: dict):
  """(drift, diffusion) of the reverse-time SDE: with beta(t) = -gamma'(t)(1 - alpha_bar(t))
  and the score -(z - sqrt(alpha_bar) u_hat) / (1 - alpha_bar),
  dz = -gamma' (sqrt(alpha_bar) u_hat - (1 + alpha_bar) / 2 z) dt + sqrt(beta) dW."""

  def drift(t, z, h):
    s = schedule_at(model, params, t)
    return -s.gamma_prime * (jnp.sqrt(s.alpha_bar) * _u_hat(model, params, h, z, t)
                             - 0.5 * (1.0 + s.alpha_bar) * z)

  def diffusion(t, z, h):
    s = schedule_at(model, params, t)
    return jnp.sqrt(-s.gamma_prime * s.one_minus_alpha_bar)

  return drift, diffusion


def integrate(model: Model, state: State, h, z0: jax.Array, key: jax.Array | None = None,
              steps: int | None = None) -> jax.Array:
  """z_1 from z_0 in `steps` (default model.inference_steps) steps: Euler on the probability
  flow, or, with `key` and the 'sde' sampler, Euler-Maruyama on the reverse SDE."""
  steps = steps or model.inference_steps
  params = state["params"]
  if key is not None and model.ct_sampler == "sde":
    return solvers.euler_maruyama(*reverse_sde(model, params), z0, 0.0, 1.0, steps, key, h)
  return solvers.euler(probability_flow(model, params), z0, 0.0, 1.0, steps, h)


def features(model: Model, state: State, x: jax.Array):
  """The block's z- and t-independent pathway, computed once per input (x without the split)."""
  return core.features(model.block, {"params": state["params"]["block"]}, core.to_float(x))


def class_scores(model: Model, state: State, z_1: jax.Array) -> jax.Array:
  """The linear head on z_1."""
  return core.head_logits(state["params"]["head"], z_1)


def predict(model: Model, state: State, x: jax.Array, key: jax.Array | None = None,
            mode: str = "mean", steps: int | None = None) -> jax.Array:
  """Class scores [B, m]. mode 'mean': z_0 = 0 and the probability-flow ODE; 'stochastic':
  z_0 ~ N(0, I) (and the SDE's noise with the 'sde' sampler), needs `key`."""
  core.check_predict(model, x, mode, key)
  return _predict(model, state, x, key, mode, steps)


@partial(jax.jit, static_argnames=("model", "mode", "steps"))
def _predict(model, state, x, key, mode, steps):
  k0, k1 = jax.random.split(key) if key is not None else (None, None)
  z0 = core.inference_noise(mode, (x.shape[0], model.dim), k0)
  return class_scores(model, state, integrate(model, state, features(model, state, x), z0, k1, steps))


def eval_counts(model: Model, compute: Compute, state: State, x: jax.Array, y: jax.Array,
                key: jax.Array, runs: int) -> tuple[jax.Array, jax.Array]:
  """(correct on the mean path, [runs] correct when sampling) on one batch."""
  core.check_batch(model, x, y, padding=True)
  h = features(model, state, x)
  k0, k1 = jax.random.split(key)
  scores = partial(class_scores, model, state)
  ode = lambda h, z: integrate(model, state, h, z)
  if model.ct_sampler == "sde" and runs:  # the sampled runs take the noisy solver
    mean, _ = core.eval_paths(ode, scores, h, y, k0, 0, model.dim)
    z0 = jax.random.normal(k0, (runs * y.shape[0], model.dim))
    h_runs = jax.tree.map(lambda a: jnp.concatenate([a] * runs), h)
    return mean, core.count_correct(scores(integrate(model, state, h_runs, z0, k1)), y, runs)
  return core.eval_paths(ode, scores, h, y, k0, runs, model.dim)


def block_calls(model: Model) -> int:
  """Block calls to classify one batch: the block at every Euler step (its image pathway once)."""
  return model.inference_steps


def describe(model: Model, compute: Compute, state: State) -> str:
  return (f"one time-conditioned block of {num_block_params(state):,} parameters, "
          f"{model.inference_steps} Euler steps at inference")


METHOD = Method(
    name="ct", title=NAME, Model=Model, init=init, train_step=train_step,
    eval_counts=eval_counts, predict=predict, num_block_params=num_block_params,
    block_calls=block_calls, describe=describe, time_conditioned=TIME_CONDITIONED,
    epochs=budgets(digits=40, mnist=100, cifar10=500, cifar100=1000),
    metrics=("ce", "kl", "denoise", "mse", "block_accuracy", "gamma_0", "gamma_1"),
    shown=("gamma_0", "gamma_1"), bf16=True, resumable=("inference_steps", "ct_sampler"),
    summary=summary,
    # 1000-step inference costs about 20 digits training epochs: evaluate every 10.
    eval_every={"digits": 10})
