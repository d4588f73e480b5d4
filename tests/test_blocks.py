"""Exact parameter counts (paper Table 5) and the custom-gradient convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax import dt, trainer
from noprop_jax.config import Config
from noprop_jax.conv import conv2d as conv_patches, conv2d_gemm, im2col
from noprop_jax.models import init_embedding, max_pool_2x2


def _params_per_block(**kw) -> int:
  cfg = Config.create(**kw)
  state = jax.eval_shape(lambda k: trainer.init_state(cfg, k), jax.random.key(0))
  return trainer.method_module(cfg).params_per_block(state)


@pytest.mark.parametrize("kw, expected", [
    (dict(dataset="mnist"), 919_946),
    (dict(dataset="fashion_mnist"), 919_946),
    (dict(dataset="cifar10"), 1_215_434),
    (dict(dataset="cifar100"), 1_250_084),
    (dict(dataset="cifar100", embedding="learned", embedding_dim=20), 1_229_604),
    # Prototype embeddings: the noisy label goes through its own image pathway.
    (dict(dataset="mnist", embedding="prototype"), 1_401_738),
    (dict(dataset="cifar10", embedding="prototype"), 1_992_714),
    (dict(dataset="cifar100", embedding="prototype"), 2_004_324),
    (dict(dataset="mnist", method="ct", embedding="prototype"), 1_482_122),
    (dict(dataset="mnist", method="fm", embedding="prototype"), 1_482_122),
    (dict(dataset="mnist", method="ct"), 867_722),
    # The baselines use the same blocks.
    (dict(dataset="mnist", method="backprop"), 919_946),
    (dict(dataset="mnist", method="backprop", embedding="prototype"), 1_401_738),
    (dict(dataset="mnist", method="adjoint"), 867_722),
])
def test_paper_parameter_counts(kw, expected):
  assert _params_per_block(**kw) == expected


def test_stacked_blocks_and_shared_shapes():
  cfg = Config.create(dataset="mnist", embedding="learned", embedding_dim=20, T=4)
  state = jax.eval_shape(lambda k: dt.init(cfg, k), jax.random.key(0))
  for leaf in jax.tree.leaves(state["blocks"]) + jax.tree.leaves(state["opt_blocks"]):
    assert leaf.shape[0] == 4
  assert state["shared"]["embed"].shape == (10, 20)
  assert state["shared"]["head"]["kernel"].shape == (20, 10)


def test_learned_embedding_is_orthogonal():
  W = init_embedding(jax.random.key(0), 10, 20)
  np.testing.assert_allclose(W @ W.T, np.eye(10), atol=1e-5)
  W = init_embedding(jax.random.key(0), 100, 20)  # d < m: orthonormal columns instead
  np.testing.assert_allclose(W.T @ W, np.eye(20), atol=1e-5)


@pytest.mark.parametrize("impl", ["patches", "gemm"])
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_custom_convs_have_the_stock_value_and_gradient(padding, impl):
  conv2d = {"patches": conv_patches, "gemm": conv2d_gemm}[impl]
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 9, 7, 5))
  w = jax.random.normal(kw, (3, 3, 5, 4))
  stock = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = stock(x, w)
  g = jax.random.normal(kg, y.shape)
  np.testing.assert_allclose(conv2d(x, w, padding), y, rtol=1e-5, atol=1e-5)
  f = lambda conv: lambda x, w: jnp.sum(conv(x, w) * g)
  want = jax.grad(f(stock), argnums=(0, 1))(x, w)
  got = jax.grad(f(lambda x, w: conv2d(x, w, padding)), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # and under vmap over stacked weights, as the blocks use it
  ws = jnp.stack([w, 2 * w])
  got = jax.vmap(jax.grad(f(lambda x, w: conv2d(x, w, padding)), argnums=1), (None, 0))(x, ws)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


def test_im2col_orders_features_as_the_kernel_flattens():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  p = im2col(x)
  assert p.shape == (2, 3, 4, 27)
  i, j, c = 2, 1, 2  # kernel offset (i, j), channel c: feature (i * 3 + j) * C + c
  np.testing.assert_array_equal(p[:, 1, 2, (i * 3 + j) * 3 + c], x[:, 1 + i, 2 + j, c])


@pytest.mark.parametrize("shape", [(2, 26, 26, 3), (2, 9, 9, 4), (1, 5, 4, 2)])
def test_max_pool_matches_flax_with_floored_odd_sizes(shape):
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), shape)
  want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_array_equal(max_pool_2x2(x), want)
  g = jax.random.normal(jax.random.key(2), want.shape)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * g))(x)
  np.testing.assert_array_equal(grad(max_pool_2x2),
                                grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))))
