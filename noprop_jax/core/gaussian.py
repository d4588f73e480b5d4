"""The Gaussian pieces of the objectives and of inference.

Samples of q(z | y), the closed-form KL to N(0, I), inference's starting noise (the mean
path or the paper's sampling), and the evaluation of both paths on one batch.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from noprop_jax.core.checks import INFERENCE_MODES, check_choice

def noisy(u: jax.Array, alpha_bar, one_minus_alpha_bar, key: jax.Array) -> jax.Array:
  """A sample of q(z | y) = N(sqrt(alpha_bar) u_y, (1 - alpha_bar) I); alpha_bar a scalar
  or one value per row ([B, 1])."""
  eps = jax.random.normal(key, u.shape)
  return jnp.sqrt(alpha_bar) * u + jnp.sqrt(one_minus_alpha_bar) * eps


def gaussian_kl(u: jax.Array, alpha_bar, log_one_minus_alpha_bar) -> jax.Array:
  """KL(N(sqrt(a) u_y, (1 - a) I) || N(0, I)) in closed form, averaged over the batch:
  (1/2) sum_d [a u^2 + (1 - a) - 1 - log(1 - a)]."""
  return 0.5 * jnp.mean(jnp.sum(alpha_bar * u**2 - alpha_bar - log_one_minus_alpha_bar, axis=-1))


def inference_noise(mode: str, shape: tuple[int, ...], key: jax.Array | None) -> jax.Array:
  """Inference's starting noise: zeros on the deterministic mean path ('mean'), N(0, I)
  draws for the paper's sampling ('stochastic', needs `key`)."""
  check_choice("inference mode", mode, INFERENCE_MODES)
  if mode == "mean":
    return jnp.zeros(shape, jnp.float32)
  if key is None:
    raise ValueError("stochastic inference needs a PRNG key")
  return jax.random.normal(key, shape)


def eval_paths(solve: Callable, scores: Callable, h: Any, y: jax.Array, key: jax.Array,
               runs: int, d: int) -> tuple[jax.Array, jax.Array]:
  """(correct on the mean path, [runs] correct when sampling) on one batch of a method
  that maps z_0 to scores: the mean path (z_0 = 0) and `runs` draws z_0 ~ N(0, I) go
  through `solve(h, z_0)` together as one [(1 + runs) B, d] batch, with `h` (the
  inputs' features) tiled to match. Labels -1 (padding) never count."""
  B = y.shape[0]
  z0 = jnp.concatenate([jnp.zeros((B, d)), jax.random.normal(key, (runs * B, d))])
  h = jax.tree.map(lambda a: jnp.concatenate([a] * (1 + runs)), h)
  c = count_correct(scores(solve(h, z0)), y, 1 + runs)
  return c[0], c[1:]


def count_correct(scores: jax.Array, y: jax.Array, runs: int) -> jax.Array:
  """[runs] correct predictions of `runs` stacked batches of scores; labels -1 never count."""
  pred = jnp.argmax(scores, -1).reshape(runs, -1)
  return jnp.sum(pred == y[None, :], axis=1)
