"""Dropout with the fused random bits: bit for bit `jax.random` and flax's `nn.Dropout`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax import dropout

SHAPES = [(5,), (3, 7, 2), (128, 11, 11, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5])
def test_bits_and_masks_are_jax_randoms(seed, shape):
  key = jax.random.fold_in(jax.random.key(seed), 7)
  np.testing.assert_array_equal(dropout.random_bits(key, shape), jax.random.bits(key, shape))
  for p in (0.8, 0.5, 0.1):
    np.testing.assert_array_equal(dropout.bernoulli(key, p, shape),
                                  jax.random.bernoulli(key, p, shape))


def test_masks_under_vmap_and_jit():
  keys = jax.random.split(jax.random.key(3), 4)
  ours = jax.jit(jax.vmap(lambda k: dropout.bernoulli(k, 0.8, (6, 9))))(keys)
  np.testing.assert_array_equal(ours, jax.vmap(lambda k: jax.random.bernoulli(k, 0.8, (6, 9)))(keys))


def test_other_key_implementations_fall_back_to_jax_random():
  key = jax.random.key(4, impl="rbg")
  np.testing.assert_array_equal(dropout.bernoulli(key, 0.8, (4, 5)),
                                jax.random.bernoulli(key, 0.8, (4, 5)))


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_dropout_is_flax_dropout_in_value_and_gradient(rate):
  x = jax.random.normal(jax.random.key(1), (4, 13, 13, 32))
  rngs = {"dropout": jax.random.key(5)}

  def out(module, x, deterministic=False):
    return module(rate).apply({}, x, deterministic=deterministic, rngs=rngs)

  np.testing.assert_array_equal(out(dropout.Dropout, x), out(nn.Dropout, x))
  np.testing.assert_array_equal(out(dropout.Dropout, x, True), x)
  grad = lambda m: jax.grad(lambda x: jnp.sum(out(m, x) ** 2))(x)
  np.testing.assert_array_equal(grad(dropout.Dropout), grad(nn.Dropout))
  if 0.0 < rate < 1.0:  # and it drops about `rate` of the elements
    assert abs(float(jnp.mean(out(dropout.Dropout, x) == 0)) - rate) < 0.01


def _fusions_hashing(compiled_text: str, batch: int) -> int:
  """Fused computations of a compiled XLA:CPU program that run threefry's rotations over
  arrays of `batch` examples (the keys' own scalar hashes not counted)."""
  return sum("shift-left" in c and f"[{batch}," in c.split("\n")[0]
             for c in compiled_text.split("\n\n") if c.startswith("%fused"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the XLA:CPU form of the mask")
def test_the_mask_is_hashed_once_however_many_consumers_read_it():
  # A dropout output read by the next convolution's 9 patch slices and by its own
  # gradient: XLA fuses an elementwise producer into every consumer, so without the
  # mask in a buffer of its own the 20-round hash ran ~10 times per element.
  from noprop_jax.conv import im2col

  def f(a, w, key):
    h = dropout.Dropout(0.2).apply({}, jax.nn.relu(a), deterministic=False,
                                   rngs={"dropout": key})
    p = im2col(h)
    return jnp.sum((p.reshape(-1, p.shape[-1]) @ w) ** 2)

  a = jax.random.normal(jax.random.key(0), (8, 13, 13, 32))
  w = jax.random.normal(jax.random.key(1), (288, 64))
  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  assert _fusions_hashing(step.lower(a, w, jax.random.key(2)).compile().as_text(), 8) == 1
