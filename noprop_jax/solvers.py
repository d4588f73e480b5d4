"""Fixed-step Euler (ODE) and Euler-Maruyama (SDE) solvers on `lax.scan`.

Generic over the vector field, diffrax-style: `f(t, y, args) -> dy/dt`, with y
any pytree of arrays. The number of steps is a Python int (it fixes the scan
length); t0 and t1 may be traced. Both solvers are first order: Euler's global
error is O(h) and Euler-Maruyama's weak error is O(h) (tests measure both).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
VectorField = Callable[[jax.Array, PyTree, Any], PyTree]


def _grid(t0, t1, n_steps: int, dtype) -> tuple[jax.Array, jax.Array]:
  if n_steps < 1:
    raise ValueError(f"n_steps must be >= 1, got {n_steps}")
  t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
  h = (t1 - t0) / n_steps
  # t_i = t0 + i h, computed from i (not accumulated) so the grid does not drift.
  return t0 + h * jnp.arange(n_steps, dtype=dtype), h


def _dtype(y0: PyTree):
  return jnp.result_type(*jax.tree.leaves(y0))


def euler(f: VectorField, y0: PyTree, t0, t1, n_steps: int, args: Any = None) -> PyTree:
  """y(t1) for dy/dt = f(t, y, args), y(t0) = y0, by n_steps explicit Euler steps."""
  ts, h = _grid(t0, t1, n_steps, _dtype(y0))

  def step(y, t):
    return jax.tree.map(lambda a, da: a + h * da, y, f(t, y, args)), None

  return lax.scan(step, y0, ts)[0]


def euler_maruyama(drift: VectorField, diffusion: VectorField, y0: PyTree, t0, t1, n_steps: int,
                   key: jax.Array, args: Any = None) -> PyTree:
  """y(t1) for dy = drift(t, y) dt + diffusion(t, y) dW (diagonal noise), y(t0) = y0.

  `diffusion` returns, per leaf, an array broadcastable to the leaf: the
  standard deviation rate of independent Brownian motions, one per element.
  """
  ts, h = _grid(t0, t1, n_steps, _dtype(y0))
  leaves, treedef = jax.tree.flatten(y0)
  sqrt_h = jnp.sqrt(jnp.abs(h))

  def step(y, inp):
    t, k = inp
    dW = jax.tree.unflatten(treedef, [
        sqrt_h * jax.random.normal(kk, a.shape, a.dtype)
        for kk, a in zip(jax.random.split(k, len(leaves)), leaves)])
    mu, sigma = drift(t, y, args), diffusion(t, y, args)
    return jax.tree.map(lambda a, m, s, w: a + h * m + s * w, y, mu, sigma, dW), None

  return lax.scan(step, y0, (ts, jax.random.split(key, n_steps)))[0]
