"""Fixed-step Euler (ODE) and Euler-Maruyama (SDE) solvers on `lax.scan`.

Generic over the vector field, diffrax-style: `f(t, y, args) -> dy/dt`, with y
any pytree of arrays. The number of steps is a Python int (it fixes the scan
length); t0 and t1 may be traced. Both solvers are first order: Euler's global
error is O(h) and Euler-Maruyama's weak error is O(h) (tests measure both).

`euler_adjoint` is `euler` whose gradient comes from the adjoint sensitivity
method (Chen et al., 2018): the adjoint ODE is solved backwards in time with
the same Euler steps, so memory does not grow with the number of steps.
"""

from functools import partial
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


def _scan_steps(step, init, t0, h, n_steps: int, reverse: bool = False):
  """lax.scan of `step(carry, t_i)` over t_i = t0 + i h, i < n_steps (backwards if
  `reverse`), with i carried rather than stored: no O(n_steps) array."""
  def body(carry, _):
    c, i = carry
    i = i - 1 if reverse else i
    c = step(c, t0 + h * i.astype(h.dtype))
    return (c, i if reverse else i + 1), None

  start = jnp.asarray(n_steps if reverse else 0, jnp.int32)
  return lax.scan(body, (init, start), None, length=n_steps)[0][0]


def _dtype(y0: PyTree):
  return jnp.result_type(*jax.tree.leaves(y0))


def euler(f: VectorField, y0: PyTree, t0, t1, n_steps: int, args: Any = None) -> PyTree:
  """y(t1) for dy/dt = f(t, y, args), y(t0) = y0, by n_steps explicit Euler steps."""
  ts, h = _grid(t0, t1, n_steps, _dtype(y0))
  step = lambda y, t: jax.tree.map(lambda a, da: a + h * da, y, f(t, y, args))
  return _scan_steps(step, y0, ts[0], h, n_steps)


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


def euler_adjoint(f: VectorField, y0: PyTree, t0: float, t1: float, n_steps: int,
                  args: PyTree) -> PyTree:
  """`euler(f, y0, t0, t1, n_steps, args)`, differentiable in y0 and args by the adjoint method.

  The backward pass integrates, from t1 back to t0 with n_steps Euler steps,
  the augmented system of Chen et al. (2018):
    dy/dt = f(t, y, args),  da/dt = -a^T df/dy,  dg/dt = -a^T df/dargs,
  from y(t1), a(t1) = dL/dy(t1), g(t1) = 0; then dL/dy0 = a(t0), dL/dargs = g(t0).
  y is re-created backwards instead of stored, so the memory is that of one
  step whatever n_steps is, and the gradient matches back-propagation through
  the forward Euler solve up to O(h). `f` must be deterministic; t0, t1 are
  Python floats; `args` holds everything `f` differentiates (parameters, and
  inputs that carry gradient).
  """
  _grid(t0, t1, n_steps, _dtype(y0))  # validates n_steps
  return _euler_adjoint(f, float(t0), float(t1), n_steps, y0, args)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _euler_adjoint(f, t0, t1, n_steps, y0, args):
  return euler(f, y0, t0, t1, n_steps, args)


def _euler_adjoint_fwd(f, t0, t1, n_steps, y0, args):
  y1 = euler(f, y0, t0, t1, n_steps, args)
  return y1, (y1, args)


def _euler_adjoint_bwd(f, t0, t1, n_steps, res, a1):
  y1, args = res
  ts, h = _grid(t0, t1, n_steps, _dtype(y1))

  def step(carry, t):  # one Euler step of the augmented system from t + h back to t
    y, a, g = carry
    dy, vjp = jax.vjp(lambda y_, args_: f(t + h, y_, args_), y, args)
    a_dy, a_dargs = vjp(a)
    back = lambda u, du: u - h * du
    fwd = lambda u, du: u + h * du
    return (jax.tree.map(back, y, dy), jax.tree.map(fwd, a, a_dy),
            jax.tree.map(fwd, g, a_dargs))

  zeros = jax.tree.map(jnp.zeros_like, args)
  _, a0, g0 = _scan_steps(step, (y1, a1, zeros), ts[0], h, n_steps, reverse=True)
  return a0, g0


_euler_adjoint.defvjp(_euler_adjoint_fwd, _euler_adjoint_bwd)
