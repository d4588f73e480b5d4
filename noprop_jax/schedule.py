"""Noise schedules in NoProp's time direction: t = 0 noise, t = T (or 1) label.

NoProp-DT uses a fixed cosine schedule over T steps; NoProp-CT a learned
continuous schedule (`LearnedSchedule`).

alpha_bar_t increases with t, so SNR(t) - SNR(t-1) > 0 and the weighted
denoising loss is minimised (running it in the DDPM direction, as some public
re-implementations do, makes the weights negative).
"""

import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class DTSchedule(NamedTuple):
  alpha_bar: jnp.ndarray  # [T + 1], alpha_bar[t] for t = 0..T, increasing
  snr: jnp.ndarray  # [T + 1]
  a: jnp.ndarray  # [T], posterior coefficients for t = 1..T (index t - 1)
  b: jnp.ndarray  # [T]
  c: jnp.ndarray  # [T]
  dsnr: jnp.ndarray  # [T], SNR(t) - SNR(t-1) for t = 1..T (index t - 1), > 0


def cosine_alpha_bar(T: int, lo: float = 1e-4, hi: float = 0.9999, s: float = 0.008) -> np.ndarray:
  """alpha_bar_t = f(T - t) / f(0), f(u) = cos^2((u / T + s) / (1 + s) * pi / 2), clipped.

  The cosine schedule of Nichol & Dhariwal read backwards, in float64.
  """
  u = (T - np.arange(T + 1, dtype=np.float64)) / T
  f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.clip(f / f[-1], lo, hi)


def dt_schedule(T: int, lo: float = 1e-4, hi: float = 0.9999) -> DTSchedule:
  """The cosine schedule's alpha_bar, SNR, posterior coefficients (z_t = a_t u_hat_t + b_t
  z_{t-1} + sqrt(c_t) eps) and the SNR increments that weigh Eq. 8's denoising terms."""
  ab = cosine_alpha_bar(T, lo, hi)
  if not np.all(np.diff(ab) > 0):
    raise ValueError(f"alpha_bar must increase strictly with t; T={T}, clip [{lo}, {hi}] "
                     "collapses neighbouring steps")
  snr = ab / (1 - ab)
  ab_t, ab_prev = ab[1:], ab[:-1]
  alpha_prev = ab_prev / ab_t  # alpha_{t-1} in the paper's notation
  a = np.sqrt(ab_t) * (1 - alpha_prev) / (1 - ab_prev)
  b = np.sqrt(alpha_prev) * (1 - ab_t) / (1 - ab_prev)
  c = (1 - ab_t) * (1 - alpha_prev) / (1 - ab_prev)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return DTSchedule(f32(ab), f32(snr), f32(a), f32(b), f32(c), f32(snr[1:] - snr[:-1]))


# ----------------------------------------------------------------------------- continuous time

class DenseMonotone(nn.Module):
  """Dense layer with strictly positive weights (softplus of free parameters):
  non-decreasing in every input. The constraint holds by construction, whatever
  values the optimizer writes into `kernel`."""

  features: int
  kernel_init: Callable = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    raw = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    y = x @ jax.nn.softplus(raw)
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


class LearnedSchedule(nn.Module):
  """gamma(t) = -log SNR(t) for t in [0, 1], decreasing: t = 0 noise, t = 1 label.

  Appendix B of the paper, after Variational Diffusion Models: a monotone
  network g(t) = l1(t) + l3(sigmoid(l2(t))), normalised to
  gamma_bar(t) = (g(t) - g(0)) / (g(1) - g(0)) in [0, 1], and
  gamma(t) = gamma_0 + (gamma_1 - gamma_0) (1 - gamma_bar(t)).
  As in VDM, gamma_0 is the label end (gamma(1), lowest noise) and gamma_1 the
  noise end (gamma(0)); both train. alpha_bar(t) = sigmoid(-gamma(t)).
  """

  gamma_0_init: float
  gamma_1_init: float
  hidden: int = 1024

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    g0 = self.param("gamma_0", nn.initializers.constant(self.gamma_0_init), ())
    g1 = self.param("gamma_1", nn.initializers.constant(self.gamma_1_init), ())
    l1, l2, l3 = DenseMonotone(1, name="l1"), DenseMonotone(self.hidden, name="l2"), DenseMonotone(1, name="l3")
    g = lambda s: (l1(s) + l3(jax.nn.sigmoid(l2(s))))[..., 0]
    ends = g(jnp.array([[0.0], [1.0]], t.dtype))
    gamma_bar = (g(t[..., None]) - ends[0]) / (ends[1] - ends[0])
    return g0 + (g1 - g0) * (1.0 - gamma_bar)


class ScheduleValues(NamedTuple):
  gamma: jax.Array
  alpha_bar: jax.Array  # sigmoid(-gamma)
  one_minus_alpha_bar: jax.Array  # sigmoid(gamma), accurate where alpha_bar is near 1
  snr: jax.Array  # exp(-gamma)
  snr_prime: jax.Array  # d SNR / dt = -gamma'(t) exp(-gamma(t)) >= 0
  gamma_prime: jax.Array


def schedule_values(model: LearnedSchedule, params, t: jax.Array) -> ScheduleValues:
  """The schedule and its time derivative at each element of t (exact, by jax.jvp).

  gamma acts elementwise on t, so a forward-mode derivative with unit tangent
  gives gamma'(t) for every element at once.
  """
  gamma, dgamma = jax.jvp(lambda s: model.apply({"params": params}, s), (t,), (jnp.ones_like(t),))
  snr = jnp.exp(-gamma)
  return ScheduleValues(gamma, jax.nn.sigmoid(-gamma), jax.nn.sigmoid(gamma), snr,
                        -dgamma * snr, dgamma)
