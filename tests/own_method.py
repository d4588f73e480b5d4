"""A method defined outside the package from its documented contract alone, as a user
would write one: NoProp-DT with noise prediction ("dt_eps").

Block t sees z_{t-1} = sqrt(alpha_bar_{t-1}) u_y + sqrt(1 - alpha_bar_{t-1}) eps and
predicts the noise eps instead of the label embedding u_y (one-hot here); its estimate
of u_y follows: u_hat = (z - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar). The
objective is DDPM's simple noise loss summed over the independent blocks,

  L = w sum_{t=1..T} E ||eps_hat_t(z_{t-1}, x) - eps||^2,

and inference is NoProp-DT's chain z_t = a_t u_hat_t + b_t z_{t-1} + sqrt(c_t) eps_t
(u_hat clipped to the embedding's range, as DDPM clips its x_0 estimate: at the noise
end 1 / sqrt(alpha_bar) amplifies the noise estimate's error ~100x).

Importing this module registers the method (`experiments/train.py --method-module
tests/own_method.py --method dt_eps`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from noprop_jax import core, method
from noprop_jax.core import Compute, Optim
from noprop_jax.schedule import dt_schedule
from noprop_jax.setting import setting


@dataclasses.dataclass(frozen=True)
class Model:
  block: nn.Module  # (x, z) -> eps_hat [B, num_classes]
  input_shape: tuple[int, ...]  # one input's shape
  num_classes: int  # m, also the embedding's dimension (one-hot)
  T: int = setting(4, "number of blocks")
  noise_weight: float = setting(1.0, "w: every block's weight in the noise loss")

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    core.check_positive("noise_weight", self.noise_weight)
    core.check_block(self.block, False, "dt_eps")

  @property
  def schedule(self):
    return dt_schedule(self.T)


def init(model: Model, key: jax.Array, optim: Optim = Optim(), embed=None):
  x = jnp.zeros((1, *model.input_shape), jnp.float32)
  z = jnp.zeros((1, model.num_classes), jnp.float32)
  blocks = core.init_stacked(model.block, jax.random.fold_in(key, 0), model.T, x, z)
  return core.stacked_state(key, blocks, {}, core.adamw(optim))


def block_error(model: Model, variables: dict, x, y, t, key):
  """Block t's noise error ||eps_hat_t(z_{t-1}, x) - eps||^2 (batch mean), and its new
  BatchNorm statistics."""
  ab = model.schedule.alpha_bar[t - 1]
  k_noise, k_drop = jax.random.split(key)
  u = jax.nn.one_hot(y, model.num_classes)
  eps = jax.random.normal(k_noise, u.shape)
  z = jnp.sqrt(ab) * u + jnp.sqrt(1.0 - ab) * eps
  eps_hat, updates = core.apply(model.block, variables, x, z, train=True, rng=k_drop)
  return jnp.mean(jnp.sum((eps_hat - eps) ** 2, axis=-1)), updates


def loss(model: Model, blocks: dict, x, y, key):
  """L = w sum_t E ||eps_hat_t - eps||^2 on one batch (key: `core.step_key(state)`)."""
  x = core.to_float(x)
  t = jnp.arange(1, model.T + 1)
  err_T, _ = jax.vmap(lambda v, t: block_error(model, v, x, y, t, jax.random.fold_in(key, t)))(
      blocks, t)
  return model.noise_weight * err_T.sum()


def train_step(model: Model, optim: Optim, compute: Compute, state, x, y):
  """Every block on its own term of `loss` (the same function), each by its own AdamW."""
  core.check_batch(model, x, y)
  x, key = core.to_float(x), core.step_key(state)

  def one(inp):
    variables, t = inp
    term = lambda p: block_error(model, {**variables, "params": p}, x, y, t,
                                 jax.random.fold_in(key, t))
    (err, updates), g = jax.value_and_grad(term, has_aux=True)(variables["params"])
    return model.noise_weight * err, updates, jax.tree.map(lambda a: model.noise_weight * a, g)

  loss_T, updates, g_blocks = core.map_blocks(one, (state["blocks"], jnp.arange(1, model.T + 1)),
                                              compute)
  value = loss_T.sum()
  ok = core.update_ok(value, (g_blocks, updates), y, model.num_classes)
  update = lambda s: core.stacked_update(core.adamw(optim), s, g_blocks, {}, updates)
  return core.apply_if(ok, update, state), {"loss": value, "skipped": core.skipped(ok),
                                            "block_loss": loss_T}


def _chain(model: Model, state, x, z0_BD, eps_TBD):
  s, x = model.schedule, core.to_float(x)

  def step(z, inp):
    v, ab, a, b, c, eps = inp
    eps_hat = core.apply(model.block, v, x, z)[0]
    u_hat = jnp.clip((z - jnp.sqrt(1.0 - ab) * eps_hat) / jnp.sqrt(ab), 0.0, 1.0)
    return a * u_hat + b * z + jnp.sqrt(c) * eps, None

  xs = (state["blocks"], s.alpha_bar[:-1], s.a, s.b, s.c, eps_TBD)
  return lax.scan(step, z0_BD, xs)[0]


def predict(model: Model, state, x, key=None, mode: str = "mean"):
  core.check_predict(model, x, mode, key)
  k0, k1 = jax.random.split(key) if key is not None else (None, None)
  shape = (x.shape[0], model.num_classes)
  return _chain(model, state, x, core.inference_noise(mode, shape, k0),
                core.inference_noise(mode, (model.T, *shape), k1))


def eval_counts(model: Model, compute: Compute, state, x, y, key, runs: int):
  shape = (model.T, y.shape[0], model.num_classes)
  correct = lambda z0, eps: core.count_correct(_chain(model, state, x, z0, eps), y, 1)[0]

  def sample(k):
    k0, k1 = jax.random.split(k)
    return correct(jax.random.normal(k0, shape[1:]), jax.random.normal(k1, shape))

  runs_ = jax.vmap(sample)(jax.random.split(key, runs)) if runs else jnp.zeros((0,), jnp.int32)
  return correct(jnp.zeros(shape[1:]), jnp.zeros(shape)), runs_


METHOD = method.register(method.Method(
    name="dt_eps", title="NoProp-DT, noise prediction", Model=Model, init=init,
    train_step=train_step, eval_counts=eval_counts, predict=predict,
    num_block_params=lambda state: core.count_params(state["blocks"]["params"])
    // core.num_stacked(state["blocks"]["params"]),
    block_calls=lambda model: model.T,
    describe=lambda model, compute, state: f"T={model.T}, noise prediction",
    time_conditioned=False, epochs=method.budgets(digits=6, mnist=50, cifar10=100, cifar100=100),
    stacked=("blocks", "opt_blocks"), metrics=("block_loss",)))
