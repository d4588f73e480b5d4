"""NoProp in JAX: networks trained as independent denoising blocks."""

from noprop_jax import continuous, data, dt, schedule, solvers
from noprop_jax.config import Config

__all__ = ["Config", "continuous", "data", "dt", "schedule", "solvers"]
__version__ = "0.1.0"
