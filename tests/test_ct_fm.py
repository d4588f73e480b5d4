"""NoProp-CT and -FM: the learned schedule, the losses, the time-conditioned block, inference."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build, make_model
from noprop_jax import blocks, core, ct, dt, fm, solvers
from noprop_jax.blocks import CTBlock, sinusoidal_embedding
from noprop_jax.config import RunConfig
from noprop_jax.schedule import LearnedSchedule, schedule_values


def _scrambled_schedule(key, g0=-3.3, g1=6.1):
  """A schedule as training might leave it: random network weights (raw kernels far
  negative and positive, so the positivity constraint matters) and moved endpoints."""
  model = LearnedSchedule(-5.0, 5.0, hidden=64)
  params = model.init(key, jnp.zeros((1,)))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  params = jax.tree.unflatten(tree, [3.0 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  params["gamma_0"], params["gamma_1"] = jnp.float32(g0), jnp.float32(g1)
  return model, params


@pytest.mark.usefixtures("strict_dtypes")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_schedule_is_monotone_with_the_trained_endpoints(seed):
  model, params = _scrambled_schedule(jax.random.key(seed))
  t = jnp.linspace(0.0, 1.0, 2001)
  s = schedule_values(model, params, t)
  assert s.gamma.shape == t.shape and s.gamma.dtype == jnp.float32
  assert float(s.gamma[0]) == pytest.approx(6.1, abs=1e-5)  # gamma(0) = gamma_1: noise end
  assert float(s.gamma[-1]) == pytest.approx(-3.3, abs=1e-5)  # gamma(1) = gamma_0: label end
  assert np.all(np.diff(np.asarray(s.gamma)) <= 1e-6), "gamma must decrease in t"
  assert np.all(np.asarray(s.gamma_prime) < 0) and np.all(np.asarray(s.snr_prime) > 0)
  np.testing.assert_allclose(s.alpha_bar + s.one_minus_alpha_bar, 1.0, rtol=1e-6)
  np.testing.assert_allclose(s.snr, s.alpha_bar / s.one_minus_alpha_bar, rtol=1e-4)


def test_monotone_layers_use_positive_weights_whatever_the_raw_values():
  model, params = _scrambled_schedule(jax.random.key(3))
  params["l2"]["kernel"] = -50.0 * jnp.abs(params["l2"]["kernel"])  # softplus -> tiny, still > 0
  t = jnp.linspace(0.0, 1.0, 501)
  g = np.asarray(model.apply({"params": params}, t))
  assert np.all(np.diff(g) <= 1e-6)


def test_snr_prime_matches_finite_differences():
  model, params = _scrambled_schedule(jax.random.key(4))
  t = jnp.linspace(0.05, 0.95, 19)
  h = 1e-3
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    t64 = jnp.asarray(t, jnp.float64)
    s = schedule_values(model, p64, t64)
    snr = lambda tt: jnp.exp(-model.apply({"params": p64}, tt))
    fd = (snr(t64 + h) - snr(t64 - h)) / (2 * h)
    np.testing.assert_allclose(s.snr_prime, fd, rtol=1e-4)
  s32 = schedule_values(model, params, t)  # and the float32 path agrees with float64
  np.testing.assert_allclose(s32.snr_prime, np.asarray(s.snr_prime), rtol=2e-3)


def test_schedule_gradients_reach_the_endpoints_and_the_network():
  model, params = _scrambled_schedule(jax.random.key(5))
  t = jnp.linspace(0.0, 1.0, 33)
  g = jax.grad(lambda p: jnp.sum(schedule_values(model, p, t).snr_prime))(params)
  assert float(g["gamma_0"]) != 0 and float(g["gamma_1"]) != 0
  assert float(jnp.abs(g["l2"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("dataset, count", [("mnist", 867_722), ("cifar10", 1_163_210)])
def test_ct_block_parameter_count_matches_the_paper(dataset, count):
  for mod in (ct, fm):
    model = make_model(mod.__name__.split(".")[-1], dataset=dataset)
    assert isinstance(model.block, CTBlock) and model.block.padding == "VALID"
    state = jax.eval_shape(lambda: mod.init(model, jax.random.key(0)))
    assert mod.num_block_params(state) == count
  assert "batch_stats" not in jax.eval_shape(
      lambda: CTBlock(10).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 10)),
                               jnp.zeros((1,)), train=False))


def test_sinusoidal_embedding_shape_and_values():
  e = sinusoidal_embedding(jnp.array([0.0, 0.5, 1.0]))
  assert e.shape == (3, 64) and e.dtype == jnp.float32
  np.testing.assert_allclose(e[0], np.r_[np.zeros(32), np.ones(32)], atol=1e-7)
  np.testing.assert_allclose(e[1, 0], np.sin(500.0), atol=1e-4)
  assert not np.allclose(e[1], e[2])


# ----------------------------------------------------------------------------- the objectives

class Seen:
  """What a `Probe` saw, in call order (hashed by identity, so a Model holding it is a
  valid static argument)."""

  def __init__(self):
    self.calls = []


class Probe(nn.Module):
  """An (x, z, t) block that reports what the loss feeds it (z_t and t, by a host
  callback) and, with `exact`, returns the ideal flow-matching velocity for inputs x that
  are the one-hot labels themselves: (x - z_t) / (1 - t), which is u_y - z_0 exactly when
  z_t = t u_y + (1 - t) z_0."""

  num_classes: int
  seen: Seen
  exact: bool = False

  @nn.compact
  def __call__(self, x, z, t, train=False):
    jax.debug.callback(lambda z, t: self.seen.calls.append((np.asarray(z), np.asarray(t))), z, t)
    scale = self.param("scale", nn.initializers.ones, ())
    if self.exact:
      return scale * (x - z) / (1.0 - t)[:, None]
    return scale * z


def _onehot_batch(n, key, m=10):
  y = jax.random.randint(key, (n,), 0, m)
  return jax.nn.one_hot(y, m), y


def test_ct_noisy_input_has_the_marginal_of_q():
  """The loss feeds the block z_t = sqrt(alpha_bar(t)) u + sqrt(1 - alpha_bar(t)) eps
  (not alpha_bar u + ...), at one t ~ U[0, 1] per example."""
  seen = Seen()
  model = ct.Model(Probe(10, seen), (10,), 10)
  state = ct.init(model, jax.random.key(0))
  n = 20_000
  x, y = _onehot_batch(n, jax.random.key(1))
  seen.calls.clear()
  jax.block_until_ready(jax.jit(lambda p: ct.loss(model, p, x, y, jax.random.key(2)))(state["params"]))
  jax.effects_barrier()
  (z, t), = seen.calls
  assert z.shape == (n, 10) and t.shape == (n,)
  assert 0 <= t.min() and t.max() <= 1 and abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005
  s = ct.schedule_at(model, state["params"], jnp.asarray(t))
  ab = np.asarray(s.alpha_bar)[:, None]
  eps = (z - np.sqrt(ab) * np.asarray(x)) / np.sqrt(np.asarray(s.one_minus_alpha_bar))[:, None]
  np.testing.assert_allclose(eps.mean(0), 0.0, atol=0.03)  # sqrt(alpha_bar), not alpha_bar
  np.testing.assert_allclose(eps.var(0), 1.0, rtol=0.05)
  assert abs(float(np.corrcoef(eps[:, 0], eps[:, 1])[0, 1])) < 0.03  # independent noise


def test_ct_loss_terms(digits):
  model = make_model("ct")
  state = ct.init(model, jax.random.key(0))
  x, y = jnp.asarray(digits.train.images[:64]), jnp.asarray(digits.train.labels[:64])
  vg = jax.jit(jax.value_and_grad(lambda p, k: ct.loss(model, p, x, y, k), has_aux=True))
  (loss, m), g = vg(state["params"], jax.random.key(1))
  assert float(loss) == pytest.approx(float(m["ce"] + m["kl"] + m["denoise"]), rel=1e-6)
  assert float(m["ce"]) == pytest.approx(np.log(10), rel=1e-5)  # zero head: uniform
  ab0 = 1 / (1 + np.exp(model.gamma_1_init))  # KL(N(sqrt(ab0) e_y, (1 - ab0) I) || N(0, I))
  assert float(m["kl"]) == pytest.approx(0.5 * (ab0 + 10 * (-ab0 - np.log(1 - ab0))), rel=1e-4)
  assert float(m["denoise"]) > 0 and 0 < float(m["mse"]) < 2
  for k in ("gamma_0", "gamma_1"):  # Algorithm 2: the schedule trains with the rest
    assert float(g["schedule"][k]) != 0
  assert float(jnp.abs(g["schedule"]["l2"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["block"]["image"]["Conv_0"]["kernel"]).sum()) > 0


def test_fm_path_and_target():
  """The loss's path is z_t = t u_y + (1 - t) z_0 (+ sigma eps) and its target the path's
  time derivative u_y - z_0: the ideal velocity (u_y - z_t) / (1 - t) has zero loss, and
  its one-step estimate z_t + (1 - t) v lands on u_y."""
  n = 4096
  x, y = _onehot_batch(n, jax.random.key(1))
  seen = Seen()
  model = fm.Model(Probe(10, seen, exact=True), (10,), 10)
  state = fm.init(model, jax.random.key(0))
  seen.calls.clear()
  loss_of = lambda model, p, k=jax.random.key(2): jax.jit(lambda p: fm.loss(model, p, x, y, k))(p)
  loss, m = loss_of(model, state["params"])
  jax.effects_barrier()
  assert float(loss) == float(m["fm"]) < 1e-6 and float(m["block_accuracy"]) == 1.0
  (z, t), = seen.calls
  assert 0 <= t.min() and t.max() <= 1 and abs(t.mean() - 0.5) < 0.02
  # z_0 = (z_t - t u) / (1 - t) is the N(0, I) start of the path.
  z0 = (z - t[:, None] * np.asarray(x)) / (1 - t[:, None])
  keep = t < 0.9  # away from t = 1, where recovering z_0 divides by ~0
  np.testing.assert_allclose(z0[keep].mean(0), 0.0, atol=0.05)
  np.testing.assert_allclose(z0[keep].var(0), 1.0, rtol=0.1)
  # A wrong field is penalised, and sigma > 0 moves z_t off the straight path.
  wrong = fm.Model(Probe(10, seen), (10,), 10)
  assert float(loss_of(wrong, fm.init(wrong, jax.random.key(0))["params"])[0]) > 1.0
  noisy = dataclasses.replace(model, fm_sigma=0.1)
  assert float(loss_of(noisy, state["params"])[0]) > 1e-3


def test_fm_anchor_with_a_learned_embedding(digits):
  model = fm.Model(blocks.MLPTimeBlock(10, hidden=16, depth=1), (64,), 10, embedding="learned",
                   embedding_dim=6)
  state = fm.init(model, jax.random.key(0))
  assert model.anchored and set(state["params"]) == {"block", "embed", "head"}
  x, y = jnp.asarray(digits.train.images[:32].reshape(32, 64)), jnp.asarray(digits.train.labels[:32])
  (loss, m), g = jax.jit(jax.value_and_grad(lambda p: fm.loss(model, p, x, y, jax.random.key(1)),
                                            has_aux=True))(state["params"])
  assert float(loss) == pytest.approx(float(m["fm"] + m["ce"]), rel=1e-6)
  assert float(m["ce"]) == pytest.approx(np.log(10), rel=1e-5)  # zero head: uniform
  assert float(jnp.abs(g["embed"]).sum()) > 0 and float(jnp.abs(g["head"]["kernel"]).sum()) > 0


def test_euler_on_the_ideal_fm_field_lands_on_the_class_embedding():
  """For a point-mass target the marginal velocity is (u - z) / (1 - t); Euler's last
  step (from t = 1 - h) lands exactly on u, so the nearest embedding is the class."""
  W = jnp.eye(4)
  u = W[jnp.array([2, 0])]
  z1 = solvers.euler(lambda t, z, u: (u - z) / (1.0 - t), jax.random.normal(jax.random.key(0), (2, 4)),
                     0.0, 1.0, 25, u)
  np.testing.assert_allclose(z1, u, atol=1e-5)


# ----------------------------------------------------------------------------- inference

class WholeCTBlock(CTBlock):
  """The paper's block without its split: inference then runs the whole block, conv tower
  included, at every solver step (same parameters)."""

  features = None
  from_features = None


def _whole(model):
  b = model.block
  whole = WholeCTBlock(b.num_classes, b.padding, b.dropout, b.conv_impl, b.t_dim, b.prototype_shape)
  assert not core.has_split(whole) and core.has_split(b)
  return dataclasses.replace(model, block=whole)


@pytest.mark.parametrize("block", [CTBlock(10, "SAME", conv_impl="xla"),
                                   blocks.MLPTimeBlock(10, hidden=32)])
def test_from_features_equals_the_whole_block(block, digits):
  x = jnp.asarray(digits.test.images[:16])
  z = jax.random.normal(jax.random.key(1), (16, 10))
  variables = jax.jit(lambda k: core.init_block(block, k, x[:1], z[:1], jnp.zeros((1,))))(
      jax.random.key(0))

  @jax.jit
  def both(t):
    h = core.features(block, variables, x)
    split = core.from_features(block, variables, h, z, t)  # t a scalar
    return split, core.apply(block, variables, x, z, jnp.full((16,), t))[0]  # t per row

  for t in (0.0, 0.37, 1.0):
    split, whole = both(jnp.float32(t))
    np.testing.assert_allclose(split, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ct", "fm"])
def test_hoisted_inference_equals_whole_block_inference(method, digits):
  mod = {"ct": ct, "fm": fm}[method]
  model = make_model(method, inference_steps=20)
  state = mod.init(model, jax.random.key(0))
  step = mod.make_train_step(model)
  x, y = jnp.asarray(digits.train.images[:128]), jnp.asarray(digits.train.labels[:128])
  for _ in range(5):  # move away from the initialisation
    state, _ = step(state, x, y)
  xt = jnp.asarray(digits.test.images[:64])
  whole = _whole(model)
  hoisted, naive = mod.predict(model, state, xt), mod.predict(whole, state, xt)
  np.testing.assert_allclose(hoisted, naive, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(jnp.argmax(hoisted, -1), jnp.argmax(naive, -1))
  k = jax.random.key(2)
  np.testing.assert_allclose(mod.predict(model, state, xt, k, mode="stochastic"),
                             mod.predict(whole, state, xt, k, mode="stochastic"),
                             rtol=1e-4, atol=1e-4)


def test_eval_counts_agree_with_predict(digits):
  model = make_model("ct", inference_steps=10)
  compute = core.Compute().resolve(1)
  state = ct.init(model, jax.random.key(0))
  x, y = jnp.asarray(digits.test.images[:50]), jnp.asarray(digits.test.labels[:50])
  mean, stoch = jax.jit(lambda s, k: ct.eval_counts(model, compute, s, x, y, k, 3))(
      state, jax.random.key(1))
  assert int(mean) == int(jnp.sum(jnp.argmax(ct.predict(model, state, x), -1) == y))
  assert stoch.shape == (3,)
  sde = dataclasses.replace(model, ct_sampler="sde")  # sampled runs by the SDE
  mean_sde, stoch_sde = jax.jit(lambda s, k: ct.eval_counts(sde, compute, s, x, y, k, 2))(
      state, jax.random.key(1))
  assert int(mean_sde) == int(mean) and stoch_sde.shape == (2,)


def test_ct_sde_sampler_runs_and_differs_from_the_ode(digits):
  ode_model = make_model("ct", inference_steps=50)
  sde_model = dataclasses.replace(ode_model, ct_sampler="sde")
  state = ct.init(sde_model, jax.random.key(0))
  h = ct.features(sde_model, state, jnp.asarray(digits.test.images[:16]))
  z0 = jax.random.normal(jax.random.key(3), (16, 10))
  k = jax.random.key(4)
  sde = ct.integrate(sde_model, state, h, z0, k)
  ode = ct.integrate(ode_model, state, h, z0, k)
  assert sde.shape == ode.shape == (16, 10) and np.all(np.isfinite(sde))
  assert not np.allclose(sde, ode, atol=1e-2)
  # The ODE path is deterministic: the key is ignored.
  np.testing.assert_array_equal(ode, ct.integrate(ode_model, state, h, z0, jax.random.key(9)))


@pytest.mark.parametrize("mod", [ct, fm])
def test_predict_rejects_bad_input(mod):
  model = make_model(mod.__name__.split(".")[-1], inference_steps=5)
  state = mod.init(model, jax.random.key(0))
  with pytest.raises(ValueError, match=r"inputs must have shape \[batch, 8, 8, 1\]"):
    mod.predict(model, state, jnp.zeros((4, 28, 28, 1)))
  with pytest.raises(ValueError, match="needs a PRNG key"):
    mod.predict(model, state, jnp.zeros((4, 8, 8, 1)), mode="stochastic")
  with pytest.raises(ValueError, match="unknown inference mode"):
    mod.predict(model, state, jnp.zeros((4, 8, 8, 1)), mode="greedy")


@pytest.mark.parametrize("overrides, match", [
    (dict(method="ct", training="sequential"), r"training sequential .* is not implemented by ct; methods that have it: \['dt'"),
    (dict(method="fm", inference_steps=0), "inference_steps >= 1"),
    (dict(method="fm", fm_sigma=-0.1), "fm_sigma must be >= 0"),
    (dict(method="ct", gamma_0_init=5.0, gamma_1_init=-5.0), "gamma_1_init > gamma_0_init"),
    (dict(method="ct", ct_sampler="heun"), "unknown ct_sampler"),
    (dict(method="ct", classifier="radial"), "--classifier is a setting of dt, not of ct"),
    (dict(method="fm", eta=0.5), "--eta is a setting of dt, ct, not of fm"),
])
def test_continuous_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    RunConfig.create(**overrides)


def test_continuous_defaults_follow_table_4():
  cfg = RunConfig.create("ct", dataset="cifar10")
  model = build(cfg)[1]
  assert (model.eta, cfg.train.epochs, model.inference_steps, cfg.train.lr,
          cfg.train.weight_decay) == (1.0, 500, 1000, 1e-3, 1e-3)
  assert RunConfig.create("fm", dataset="cifar100").train.epochs == 1000
  assert RunConfig.create("fm", dataset="mnist").train.epochs == 100
  assert make_model("dt", dataset="mnist").eta == 0.1 and dt.Model.eta == 0.1
