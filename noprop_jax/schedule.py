"""NoProp-DT noise schedule in NoProp's time direction: t = 0 noise, t = T label.

alpha_bar_t increases with t, so SNR(t) - SNR(t-1) > 0 and the weighted
denoising loss is minimised (running it in the DDPM direction, as some public
re-implementations do, makes the weights negative).
"""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class DTSchedule(NamedTuple):
  alpha_bar: jnp.ndarray  # [T + 1], alpha_bar[t] for t = 0..T, increasing
  snr: jnp.ndarray  # [T + 1]
  a: jnp.ndarray  # [T], posterior coefficients for t = 1..T (index t - 1)
  b: jnp.ndarray  # [T]
  c: jnp.ndarray  # [T]
  weight: jnp.ndarray  # [T], (T / 2) * eta * (SNR(t) - SNR(t-1))


def cosine_alpha_bar(T: int, lo: float = 1e-4, hi: float = 0.9999, s: float = 0.008) -> np.ndarray:
  """alpha_bar_t = f(T - t) / f(0), f(u) = cos^2((u / T + s) / (1 + s) * pi / 2), clipped.

  The cosine schedule of Nichol & Dhariwal read backwards, in float64.
  """
  u = (T - np.arange(T + 1, dtype=np.float64)) / T
  f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  return np.clip(f / f[-1], lo, hi)


def dt_schedule(T: int, eta: float, lo: float = 1e-4, hi: float = 0.9999) -> DTSchedule:
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
  weight = 0.5 * T * eta * (snr[1:] - snr[:-1])
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return DTSchedule(f32(ab), f32(snr), f32(a), f32(b), f32(c), f32(weight))
