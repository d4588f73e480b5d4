"""Euler and Euler-Maruyama: measured orders of convergence on problems with known solutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax.solvers import euler, euler_maruyama

pytestmark = pytest.mark.usefixtures("strict_dtypes")

STEPS = [8, 16, 32, 64, 128, 256]


def _order(steps, errors) -> float:
  """Slope of log(error) against log(step size)."""
  return float(np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(np.asarray(errors)), 1)[0])


def test_euler_is_first_order_on_a_nonlinear_ode():
  # dy/dt = -2 t y^2, y(0) = 1  =>  y(t) = 1 / (1 + t^2)
  f = lambda t, y, args: -2.0 * t * y**2
  solve = jax.jit(euler, static_argnums=(0, 4))
  errors = [abs(float(solve(f, jnp.ones(()), 0.0, 2.0, n)) - 1 / 5) for n in STEPS]
  order = _order(STEPS, errors)
  assert 0.9 <= order <= 1.1, (order, errors)
  assert errors[-1] < 2e-3


def test_euler_on_a_pytree_state_with_args_and_traced_times():
  # Harmonic oscillator (x, v)' = (v, -w^2 x) from (1, 0): x(t) = cos(w t), v(t) = -w sin(w t).
  f = lambda t, y, w: {"x": y["v"], "v": -(w**2) * y["x"]}
  y0 = {"x": jnp.ones(()), "v": jnp.zeros(())}
  solve = jax.jit(lambda t1, n_w: euler(f, y0, 0.0, t1, 4096, n_w))
  out = solve(jnp.float32(1.5), jnp.float32(2.0))
  np.testing.assert_allclose([out["x"], out["v"]], [np.cos(3.0), -2 * np.sin(3.0)], atol=1e-2)
  errors = [abs(float(euler(f, y0, 0.0, 1.5, n, jnp.float32(2.0))["x"]) - np.cos(3.0)) for n in STEPS[2:]]
  assert 0.9 <= _order(STEPS[2:], errors) <= 1.1, errors


def test_euler_backwards_in_time_and_exact_on_linear_in_t_fields():
  # dy/dt = 3: Euler is exact for any step count, in either direction.
  f = lambda t, y, args: jnp.full_like(y, 3.0)
  np.testing.assert_allclose(euler(f, jnp.zeros((2,)), 1.0, 0.0, 7), [-3.0, -3.0], rtol=1e-6)
  np.testing.assert_allclose(euler(f, jnp.zeros((2,)), 0.0, 1.0, 1), [3.0, 3.0], rtol=1e-6)


def test_solvers_reject_zero_steps():
  f = lambda t, y, args: y
  with pytest.raises(ValueError, match="n_steps must be >= 1"):
    euler(f, jnp.ones(()), 0.0, 1.0, 0)
  with pytest.raises(ValueError, match="n_steps must be >= 1"):
    euler_maruyama(f, f, jnp.ones(()), 0.0, 1.0, 0, jax.random.key(0))


def test_euler_maruyama_weak_error_on_ornstein_uhlenbeck():
  """dY = -Y dt + s dW, Y_0 = 1: E[Y_1] = e^-1, Var[Y_1] = s^2 (1 - e^-2) / 2.

  Weak order 1: the error of E[Y_1] halves with the step. 400k paths make the
  Monte Carlo error (~1e-4) small against the smallest discretisation error here
  (~3e-3 at 64 steps). At 256 steps, 100k paths measure the variance to ~0.5%."""
  s = 0.2
  drift = lambda t, y, args: -y
  diffusion = lambda t, y, args: jnp.full((), s, y.dtype)
  run = jax.jit(lambda n, paths, k: euler_maruyama(drift, diffusion, jnp.ones((paths,)), 0.0, 1.0,
                                                   n, k), static_argnums=(0, 1))
  steps = [4, 8, 16, 32, 64]
  ys = [run(n, 400_000, jax.random.key(n)) for n in steps]
  mean_err = [abs(float(jnp.mean(y)) - np.exp(-1.0)) for y in ys]
  order = _order(steps, mean_err)
  assert 0.8 <= order <= 1.2, (order, mean_err)
  y = run(256, 100_000, jax.random.key(1))
  np.testing.assert_allclose(float(jnp.mean(y)), np.exp(-1.0), atol=2.5e-3)
  np.testing.assert_allclose(float(jnp.var(y)), s**2 * (1 - np.exp(-2.0)) / 2, rtol=0.02)


def test_euler_maruyama_without_diffusion_is_euler_and_noise_depends_on_key():
  f = lambda t, y, args: -2.0 * t * y**2
  zero = lambda t, y, args: jnp.zeros_like(y)
  y0 = jnp.ones((3,))
  np.testing.assert_allclose(euler_maruyama(f, zero, y0, 0.0, 2.0, 50, jax.random.key(0)),
                             euler(f, y0, 0.0, 2.0, 50), rtol=1e-6)
  g = lambda t, y, args: jnp.ones_like(y)
  a = euler_maruyama(f, g, y0, 0.0, 1.0, 50, jax.random.key(0))
  b = euler_maruyama(f, g, y0, 0.0, 1.0, 50, jax.random.key(0))
  c = euler_maruyama(f, g, y0, 0.0, 1.0, 50, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
