"""Dropout with flax's exact mask, its random bits computed in one fused pass on XLA:CPU.

`nn.Dropout` draws its mask with `jax.random.bernoulli`, whose threefry hash XLA:CPU
lowers as a 5-iteration loop over the whole mask (JAX rolls the loop on CPU to compile
faster): every iteration reads and writes two uint32 arrays of the mask's size, which made
the random bits a large share of a CPU training step. `Dropout` here computes the same
bits with the hash written out (the 20 rounds of threefry2x32 on the flat element index,
as `jax.random.bits` does with the default threefry key in JAX's partitionable mode), so
XLA fuses the hash, the comparison and the masking into one elementwise pass. Masks,
outputs and gradients are bit-for-bit flax's (tested); with another key implementation
or JAX's non-partitionable threefry it falls back to `jax.random.bernoulli`.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: jax.Array, d: int) -> jax.Array:
  return lax.shift_left(x, np.uint32(d)) | lax.shift_right_logical(x, np.uint32(32 - d))


def threefry2x32(k1, k2, x0, x1):
  """The threefry2x32 hash of the counter pairs (x0, x1) under the key (k1, k2), all uint32."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _fused_bits_apply(key: jax.Array) -> bool:
  return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
          and str(jax.random.key_impl(key)) == "threefry2x32"
          and bool(jax.config.jax_threefry_partitionable))


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bits(key, shape)` (uint32) for a threefry key, in JAX's partitionable mode:
  the hash of (0, flat index), its two words xor-ed."""
  if math.prod(shape) >= 2**32:
    raise ValueError(f"random_bits: {math.prod(shape)} elements need 64-bit counters")
  k = jax.random.key_data(key)
  index = lax.iota(np.uint32, math.prod(shape)).reshape(shape)
  hi, lo = threefry2x32(k[0], k[1], jnp.zeros_like(index), index)
  return hi ^ lo


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)`, bit for bit, with the fused hash where it applies."""
  if not _fused_bits_apply(key):
    return jax.random.bernoulli(key, p, shape)
  # jax.random.uniform's float: 23 random mantissa bits under exponent 0, minus 1.
  one = np.array(1.0, np.float32).view(np.uint32)
  u = lax.bitcast_convert_type(lax.shift_right_logical(random_bits(key, shape), np.uint32(9)) | one,
                               jnp.float32) - np.float32(1.0)
  return u < np.float32(p)


def keep_mask(key: jax.Array, keep: float, shape: tuple[int, ...]) -> jax.Array:
  """Dropout's mask, `jax.random.bernoulli(key, keep, shape)`: on XLA:CPU by the fused hash,
  materialised once (consumers that XLA duplicates, such as a convolution's k*k patch
  slices, would otherwise each recompute it); elsewhere JAX's own, which the GPU and TPU
  compilers already fuse. The same bits either way; the form is picked when the program
  is lowered for its platform."""
  return lax.platform_dependent(
      key, cpu=lambda k: _materialised(lambda: bernoulli(k, keep, shape), k),
      default=lambda k: jax.random.bernoulli(k, keep, shape))


def _materialised(make, key: jax.Array) -> jax.Array:
  """`make()`, computed once into its own buffer on XLA:CPU.

  XLA fuses an elementwise producer into each of its consumers, recomputing it there; the
  hash is cheap by XLA's measure (integer adds, shifts and xors) but 20 rounds per element,
  and a mask feeds many consumers (each of the next convolution's k*k patch slices, the
  ReLU's and dropout's gradients). An `optimization_barrier` does not stop this (XLA:CPU
  removes barriers before fusion); a conditional's result is always its own buffer, so the
  mask is made inside one whose predicate is true but not known to the compiler."""
  k = jax.random.key_data(key)
  always = (k.reshape(-1)[0] >> np.uint32(31)) < np.uint32(2)
  return lax.cond(always, make, lambda: jnp.zeros(jax.eval_shape(make).shape, bool))


class Dropout(nn.Module):
  """`nn.Dropout` (same rng collection, mask and scaling), with the fused random bits."""

  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    mask = keep_mask(self.make_rng("dropout"), keep, x.shape)
    return lax.select(mask, x / keep, jnp.zeros_like(x))
