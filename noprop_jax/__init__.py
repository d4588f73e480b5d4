"""NoProp in JAX: networks trained as independent denoising blocks."""

from noprop_jax import data, dt, schedule
from noprop_jax.config import Config

__all__ = ["Config", "data", "dt", "schedule"]
__version__ = "0.1.0"
