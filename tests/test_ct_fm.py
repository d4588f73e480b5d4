"""NoProp-CT and -FM: the learned schedule, the losses, the time-conditioned block, inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax import continuous as C
from noprop_jax import data, solvers
from noprop_jax.config import Config
from noprop_jax.models import CTBlock, count_params, sinusoidal_embedding
from noprop_jax.schedule import LearnedSchedule, schedule_values

DIGITS = data.load("digits")


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
  for method in ("ct", "fm"):
    cfg = Config.create(method=method, dataset=dataset)
    state = jax.eval_shape(lambda: C.init(cfg, jax.random.key(0)))
    assert C.params_per_block(state) == count
  assert "batch_stats" not in jax.eval_shape(
      lambda: CTBlock(10).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 10)),
                               jnp.zeros((1,)), train=False))


def test_sinusoidal_embedding_shape_and_values():
  e = sinusoidal_embedding(jnp.array([0.0, 0.5, 1.0]))
  assert e.shape == (3, 64) and e.dtype == jnp.float32
  np.testing.assert_allclose(e[0], np.r_[np.zeros(32), np.ones(32)], atol=1e-7)
  np.testing.assert_allclose(e[1, 0], np.sin(500.0), atol=1e-4)
  assert not np.allclose(e[1], e[2])


def test_ct_noisy_input_has_the_marginal_of_q():
  """z_t = sqrt(alpha_bar) u + sqrt(1 - alpha_bar) eps (not alpha_bar u + ...)."""
  cfg = Config.create(method="ct")
  params = {"schedule": C.make_schedule(cfg).init(jax.random.key(0), jnp.zeros((1,)))["params"]}
  n = 200_000
  s = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,)),  # one t = 0.4 for every row
                   C.schedule_at(cfg, params, jnp.array([0.4])))
  u = jnp.zeros((n, 10)).at[:, 3].set(1.0)
  z = C.ct_marginal_sample(u, s, jax.random.key(1))
  ab = float(s.alpha_bar[0])
  np.testing.assert_allclose(z.mean(0), np.sqrt(ab) * np.eye(10)[3], atol=1e-2)
  np.testing.assert_allclose(z.var(0), np.full(10, 1 - ab), rtol=2e-2)


def test_ct_loss_terms():
  cfg = Config.create(method="ct")
  state = C.init(cfg, jax.random.key(0))
  x, y = jnp.asarray(DIGITS.train.images[:64]), jnp.asarray(DIGITS.train.labels[:64])
  vg = jax.jit(jax.value_and_grad(lambda p, k: C.ct_loss(cfg, p, x, y, k), has_aux=True))
  (loss, m), g = vg(state["params"], jax.random.key(1))
  assert float(loss) == pytest.approx(float(m["ce"] + m["kl"] + m["denoise"]), rel=1e-6)
  assert float(m["ce"]) == pytest.approx(np.log(10), rel=1e-5)  # zero head: uniform
  ab0 = 1 / (1 + np.exp(cfg.gamma_1_init))  # KL(N(sqrt(ab0) e_y, (1 - ab0) I) || N(0, I))
  assert float(m["kl"]) == pytest.approx(0.5 * (ab0 + 10 * (-ab0 - np.log(1 - ab0))), rel=1e-4)
  assert float(m["denoise"]) > 0 and 0 < float(m["mse"]) < 2
  for k in ("gamma_0", "gamma_1"):  # Algorithm 2: the schedule trains with the rest
    assert float(g["schedule"][k]) != 0
  assert float(jnp.abs(g["schedule"]["l2"]["kernel"]).sum()) > 0


def test_fm_path_and_target():
  u = jnp.array([[0.0, 1.0, 0.0]])
  z0 = jnp.array([[0.5, -2.0, 1.0]])
  eps = jnp.zeros_like(u)
  for t in (0.0, 0.25, 1.0):
    z, target = C.fm_path(u, z0, jnp.array([t]), 0.0, eps)
    np.testing.assert_allclose(z, t * u + (1 - t) * z0, rtol=1e-6)
    np.testing.assert_allclose(target, u - z0)
  # The target is the path's time derivative, and sigma adds its noise.
  dz = jax.jvp(lambda t: C.fm_path(u, z0, t, 0.0, eps)[0], (jnp.array([0.3]),), (jnp.ones(1),))[1]
  np.testing.assert_allclose(dz, u - z0, rtol=1e-6)
  z, _ = C.fm_path(u, z0, jnp.array([0.3]), 0.1, jnp.ones_like(u))
  np.testing.assert_allclose(z, 0.3 * u + 0.7 * z0 + 0.1, rtol=1e-6)


def test_euler_on_the_ideal_fm_field_lands_on_the_class_embedding():
  """For a point-mass target the marginal velocity is (u - z) / (1 - t); Euler's last
  step (from t = 1 - h) lands exactly on u, so the nearest embedding is the class."""
  W = jnp.eye(4)
  u = W[jnp.array([2, 0])]
  z1 = solvers.euler(lambda t, z, u: (u - z) / (1.0 - t), jax.random.normal(jax.random.key(0), (2, 4)),
                     0.0, 1.0, 25, u)
  np.testing.assert_allclose(z1, u, atol=1e-5)


@pytest.mark.parametrize("method", ["ct", "fm"])
def test_hoisted_inference_equals_the_naive_per_step_block(method):
  cfg = Config.create(method=method, inference_steps=20)
  state = C.init(cfg, jax.random.key(0))
  step = C.make_train_step(cfg)
  x, y = jnp.asarray(DIGITS.train.images[:128]), jnp.asarray(DIGITS.train.labels[:128])
  for _ in range(5):  # move away from the initialisation
    state, _ = step(state, x, y)
  xt = jnp.asarray(DIGITS.test.images[:64])
  hoisted = C.predict(cfg, state, xt)
  for impl in ("naive", "per_step"):
    naive = C.predict(cfg, state, xt, impl=impl)
    np.testing.assert_allclose(hoisted, naive, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(jnp.argmax(hoisted, -1), jnp.argmax(naive, -1))
  k = jax.random.key(2)
  np.testing.assert_allclose(C.predict(cfg, state, xt, k, mode="stochastic"),
                             C.predict(cfg, state, xt, k, mode="stochastic", impl="naive"),
                             rtol=1e-4, atol=1e-4)


def test_eval_counts_agree_with_predict():
  cfg = Config.create(method="ct", inference_steps=10)
  state = C.init(cfg, jax.random.key(0))
  x, y = jnp.asarray(DIGITS.test.images[:50]), jnp.asarray(DIGITS.test.labels[:50])
  mean, stoch = jax.jit(lambda s, k: C.eval_counts(cfg, s, x, y, k, 3))(state, jax.random.key(1))
  assert int(mean) == int(jnp.sum(jnp.argmax(C.predict(cfg, state, x), -1) == y))
  assert stoch.shape == (3,)
  sde = Config.create(method="ct", inference_steps=10, ct_sampler="sde")  # sampled runs by SDE
  mean_sde, stoch_sde = jax.jit(lambda s, k: C.eval_counts(sde, s, x, y, k, 2))(state, jax.random.key(1))
  assert int(mean_sde) == int(mean) and stoch_sde.shape == (2,)


def test_ct_sde_sampler_runs_and_differs_from_the_ode():
  sde_cfg = Config.create(method="ct", inference_steps=50, ct_sampler="sde")
  ode_cfg = Config.create(method="ct", inference_steps=50)
  state = C.init(sde_cfg, jax.random.key(0))
  img = C.image_term(sde_cfg, state, jnp.asarray(DIGITS.test.images[:16]))
  z0 = jax.random.normal(jax.random.key(3), (16, 10))
  k = jax.random.key(4)
  sde = C.integrate(sde_cfg, state, img, z0, 50, k)
  ode = C.integrate(ode_cfg, state, img, z0, 50, k)
  assert sde.shape == ode.shape == (16, 10) and np.all(np.isfinite(sde))
  assert not np.allclose(sde, ode, atol=1e-2)
  # The ODE path is deterministic: the key is ignored.
  np.testing.assert_array_equal(C.integrate(ode_cfg, state, img, z0, 50, k),
                                C.integrate(ode_cfg, state, img, z0, 50, jax.random.key(9)))


def test_predict_rejects_bad_input():
  cfg = Config.create(method="fm", inference_steps=5)
  state = C.init(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"images must have shape \[batch, 8, 8, 1\]"):
    C.predict(cfg, state, jnp.zeros((4, 28, 28, 1)))
  with pytest.raises(ValueError, match="needs a PRNG key"):
    C.predict(cfg, state, jnp.zeros((4, 8, 8, 1)), mode="stochastic")
  with pytest.raises(ValueError, match="unknown inference mode"):
    C.predict(cfg, state, jnp.zeros((4, 8, 8, 1)), mode="greedy")
  with pytest.raises(ValueError, match="unknown inference impl"):
    C.predict(cfg, state, jnp.zeros((4, 8, 8, 1)), impl="lazy")


@pytest.mark.parametrize("overrides, match", [
    (dict(method="ct", training="sequential"), "NoProp-DT's"),
    (dict(method="fm", inference_steps=0), "inference_steps must be >= 1"),
    (dict(method="fm", fm_sigma=-0.1), "fm_sigma must be >= 0"),
    (dict(method="ct", gamma_0_init=5.0, gamma_1_init=-5.0), "gamma_1_init > gamma_0_init"),
    (dict(method="ct", ct_sampler="heun"), "unknown ct_sampler"),
])
def test_continuous_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    Config.create(**overrides)


def test_continuous_defaults_follow_table_4():
  ct = Config.create(method="ct", dataset="cifar10")
  assert (ct.eta, ct.epochs, ct.inference_steps, ct.lr, ct.weight_decay) == (1.0, 500, 1000, 1e-3, 1e-3)
  assert Config.create(method="fm", dataset="cifar100").epochs == 1000
  assert Config.create(method="fm", dataset="mnist").epochs == 100
  assert Config.create(method="dt", dataset="mnist").eta == 0.1
