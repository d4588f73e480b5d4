"""The provided blocks: exact parameter counts (paper Table 5), the feature split, and the
custom-gradient convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees, build
from noprop_jax import blocks, core, dt, trainer
from noprop_jax.blocks import max_pool_2x2
from noprop_jax.config import RunConfig
from noprop_jax.conv import col2im, conv2d as conv_patches, conv2d_gemm, im2col


def _params_per_block(**kw) -> int:
  """As the trainer builds the method's model for the dataset's shapes (no data loaded)."""
  cfg = RunConfig.create(**kw)
  _, model = build(cfg)
  state = jax.eval_shape(lambda k: trainer.init_state(cfg, model, k), jax.random.key(0))
  return cfg.method_record.num_block_params(state)


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
  cfg = RunConfig.create(dataset="mnist", embedding="learned", embedding_dim=20, T=4)
  _, model = build(cfg)
  state = jax.eval_shape(lambda k: dt.init(model, k), jax.random.key(0))
  for leaf in jax.tree.leaves(state["blocks"]) + jax.tree.leaves(state["opt_blocks"]):
    assert leaf.shape[0] == 4
  assert set(state["blocks"]) == {"params", "batch_stats"}  # BatchNorm statistics, per block
  assert state["shared"]["embed"].shape == (10, 20)
  assert state["shared"]["head"]["kernel"].shape == (20, 10)


def test_learned_embedding_is_orthogonal():
  W = core.init_embedding("learned", jax.random.key(0), 10, 20)
  np.testing.assert_allclose(W @ W.T, np.eye(10), atol=1e-5)
  W = core.init_embedding("learned", jax.random.key(0), 100, 20)  # d < m: orthonormal columns
  np.testing.assert_allclose(W.T @ W, np.eye(20), atol=1e-5)


@pytest.mark.parametrize("time_conditioned", [False, True])
@pytest.mark.parametrize("name, shape", [("paper", (8, 8, 1)), ("mlp", (64,)), ("mlp", (4, 4, 4))])
def test_provided_blocks_split_into_features_and_the_rest(name, shape, time_conditioned):
  """Every provided block's `from_features(features(x), z[, t])` is its `__call__`: inference
  may compute the z- and t-independent pathway once per input."""
  block = blocks.make(blocks.BlockConfig(block=name), time_conditioned, 10, shape)
  assert core.has_split(block)
  kx, kz, kp = jax.random.split(jax.random.key(0), 3)
  x, z = jax.random.uniform(kx, (5, *shape)), jax.random.normal(kz, (5, 10))
  t = (jnp.full((5,), 0.3),) if time_conditioned else ()
  variables = core.init_block(block, kp, x, z, *t)
  whole, _ = core.apply(block, variables, x, z, *t)
  h = core.features(block, variables, x)
  split = core.from_features(block, variables, h, z, *(jnp.float32(0.3),) if time_conditioned else ())
  assert whole.shape == (5, 10)
  np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)


def test_paper_block_needs_images_and_pads_small_ones():
  with pytest.raises(ValueError, match="block 'mlp'"):
    blocks.make(blocks.BlockConfig(), False, 10, (64,))
  assert blocks.padding_for((8, 8, 1)) == "SAME" and blocks.padding_for((28, 28, 1)) == "VALID"
  cfg = blocks.BlockConfig(block="mlp", hidden=32, depth=1, dropout=0.1)
  block = blocks.make(cfg, False, 7, (3, 5))
  assert isinstance(block, blocks.MLPBlock) and (block.hidden, block.depth, block.dropout) == (32, 1, 0.1)
  assert isinstance(blocks.make(cfg, True, 7, (3, 5)), blocks.MLPTimeBlock)
  for bad, match in ((dict(block="resnet"), "unknown block"), (dict(conv_impl="fft"), "conv_impl"),
                     (dict(dropout=1.0), "dropout"), (dict(hidden=0), "hidden")):
    with pytest.raises(ValueError, match=match):
      blocks.BlockConfig(**bad)


@pytest.mark.parametrize("impl, kernel", [("patches", (3, 3)), ("patches", (2, 3)), ("gemm", (3, 3))])
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_custom_convs_have_the_stock_value_and_gradient(padding, impl, kernel):
  conv2d = {"patches": conv_patches, "gemm": conv2d_gemm}[impl]
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 9, 7, 5))
  w = jax.random.normal(kw, (*kernel, 5, 4))
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
  got = jax.vmap(jax.grad(f(lambda x, w: conv2d(x, w, padding)), argnums=(0, 1)), (None, 0))(x, ws)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, padding, cropped", [
    ((2, 11, 11, 3), "VALID", (2, 10, 10, 3)), ((2, 12, 11, 3), "VALID", (2, 12, 10, 3)),
    ((2, 10, 10, 3), "VALID", (2, 10, 10, 3)), ((2, 7, 8, 3), "SAME", (2, 8, 10, 3)),
    ((2, 8, 8, 3), "SAME", (2, 8, 8, 3))])
def test_crop_for_pool_gives_an_even_valid_output(shape, padding, cropped):
  x = jax.random.normal(jax.random.key(0), shape)
  y, pad = blocks.crop_for_pool(x, padding)
  assert y.shape == cropped
  assert pad == ("VALID" if cropped != shape else padding)
  if padding == "SAME" and cropped != shape:  # padded by one, then cropped at the end
    np.testing.assert_array_equal(y[:, 1:1 + shape[1] - 1, 1:1 + shape[2]], x[:, :-1])


def test_col2im_is_the_transpose_of_im2col():
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
  g = jax.random.normal(jax.random.key(1), im2col(x).shape)
  _, vjp = jax.vjp(im2col, x)
  np.testing.assert_allclose(col2im(g), vjp(g)[0], rtol=1e-6, atol=1e-6)


def test_im2col_orders_features_as_the_kernel_flattens():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  p = im2col(x)
  assert p.shape == (2, 3, 4, 27)
  i, j, c = 2, 1, 2  # kernel offset (i, j), channel c: feature (i * 3 + j) * C + c
  np.testing.assert_array_equal(p[:, 1, 2, (i * 3 + j) * 3 + c], x[:, 1 + i, 2 + j, c])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(2, 26, 26, 3), (2, 9, 9, 4), (1, 5, 4, 2)])
def test_max_pool_matches_flax_with_floored_odd_sizes(shape, ties):
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), shape)
  if ties:  # whole windows of equal values: the gradient goes to one element, as flax's
    x = jnp.round(x).at[:, :2, :2].set(0.0)
  want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_array_equal(max_pool_2x2(x), want)
  g = jax.random.normal(jax.random.key(2), want.shape)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * g))(x)
  np.testing.assert_array_equal(grad(max_pool_2x2),
                                grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))))


# Every convolution on MNIST shapes; the crop (shared by all three) on the others, with the
# CPU default's.
@pytest.mark.parametrize("shape, padding, impls", [
    ((28, 28, 1), "VALID", ("xla", "patches", "gemm")), ((32, 32, 3), "VALID", ("gemm",)),
    ((7, 7, 1), "SAME", ("gemm",)), ((9, 10, 2), "SAME", ("gemm",))])
def test_image_path_is_the_papers_conv_relu_pool_order(shape, padding, impls):
  """The pool is taken before bias and ReLU (they commute with it), and a convolution whose
  output the pool floors skips the dropped row and column: the same function and gradient
  as conv -> ReLU -> pool written with flax's own layers (MNIST and CIFAR shapes: the last
  convolution's 9x9 and 11x11 outputs are odd; SAME padding with odd sizes)."""
  import flax.linen as nn

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i, (f, pool) in enumerate(((32, True), (64, False), (128, True))):
        x = nn.relu(nn.Conv(f, (3, 3), padding=padding, name=f"Conv_{i}")(x))
        if pool:
          x = nn.max_pool(x, (2, 2), strides=(2, 2))
      return nn.Dense(256, name="Dense_0")(x.reshape(x.shape[0], -1))

  x = jax.random.uniform(jax.random.key(0), (3, *shape))
  for impl in impls:
    path = blocks.ImagePath(padding=padding, conv_impl=impl, batchnorm=False)
    params = path.init(jax.random.key(1), x, False)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    ours = lambda p: jnp.sum(path.apply({"params": p}, x, False) ** 2)
    ref = lambda p: jnp.sum(nn.relu(Reference().apply({"params": p}, x)) ** 2)
    (v_ours, g_ours), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(f))(params) for f in (ours, ref))
    np.testing.assert_allclose(v_ours, v_ref, rtol=1e-5)
    assert_trees(g_ours, g_ref, rtol=2e-4, atol=lambda b: 2e-4 * float(jnp.abs(b).max()),
                 what=impl)


# ----------------------------------------------------------------------------- bfloat16 and t

class TimeProbe(nn.Module):
  """A time-conditioned block that returns its time embedding, computed as the provided
  blocks compute theirs: in float32, cast to the compute dtype (z's)."""

  @nn.compact
  def __call__(self, x, z_BD, t_B):
    return blocks.sinusoidal_embedding(t_B).astype(z_BD.dtype)


def test_bfloat16_compute_keeps_the_time_input_float32():
  """In bfloat16 the time embedding differs from float32's only by the rounding of its
  values (in [-1, 1]: at most 2^-9), where rounding t itself (by up to 2^-9 near 1) would
  shift the fastest sines' phases (t x 1000) by up to ~2 radians."""
  t = jnp.linspace(0.5, 1.0, 4096)
  x, z = jnp.zeros((t.size, 1)), jnp.zeros((t.size, 2))
  probe = TimeProbe()
  e16 = core.apply(probe, {"params": {}}, x, z, t, precision="bfloat16")[0]
  e32 = core.apply(probe, {"params": {}}, x, z, t, precision="float32")[0]
  assert np.abs(np.asarray(e16 - e32)).max() <= 2.0**-9
  rounded = blocks.sinusoidal_embedding(t.astype(jnp.bfloat16))  # what casting t would give
  assert np.abs(np.asarray(rounded - e32)).max() > 1.0


@pytest.mark.parametrize("name", ["paper", "mlp", "vit"])
def test_bfloat16_blocks_tell_apart_times_that_round_to_the_same_bfloat16(name):
  """t = 0.9990 and 0.9995 are one bfloat16 number: a block that saw t in bfloat16 would
  give them the same output."""
  t_a, t_b = jnp.full((4,), 0.9990), jnp.full((4,), 0.9995)
  assert t_a.astype(jnp.bfloat16)[0] == t_b.astype(jnp.bfloat16)[0]
  shape = (8, 8, 1) if name != "mlp" else (64,)
  cfg = blocks.BlockConfig(block=name, patch_size=4, dropout=0.0)
  block = blocks.make(cfg, True, 10, shape)
  x, z = jnp.full((4, *shape), 0.5), jnp.ones((4, 10))
  v = core.init_block(block, jax.random.key(0), x, z, t_a)
  # Away from initialisation (the ViT's adaLN-Zero starts with t gated off).
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  v = jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  out = lambda t: core.apply(block, v, x, z, t, precision="bfloat16")[0]
  assert np.abs(np.asarray(out(t_a) - out(t_b))).max() > 1e-2
