"""The ViT blocks: parameter counts by hand, shapes, adaLN-Zero at initialisation, what the
output depends on, validation, `make` and dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build, library_methods
from noprop_jax import blocks, config, core, trainer
from noprop_jax.blocks import BlockConfig, ViTBlock, ViTTimeBlock
from noprop_jax import method as methods
from noprop_jax.config import RunConfig

B = 3
SMALL = (16, 16, 1)  # default patch 8 (the conv stem): a 2 x 2 grid of image tokens

# Compiled once per block and shapes: eagerly, each of the blocks' small ops would compile alone.
_apply = jax.jit(core.apply, static_argnums=0, static_argnames=("train", "method", "precision"))


def _inputs(seed=0, shape=SMALL, d=10):
  rs = np.random.RandomState(seed)  # host randomness: nothing to compile
  return (jnp.asarray(rs.uniform(size=(B, *shape)), jnp.float32),
          jnp.asarray(rs.normal(size=(B, d)), jnp.float32))


@functools.cache
def _variables(block) -> dict:
  """The block's initial variables for `_inputs()`; a block's init compiles once per file."""
  x, z = _inputs()
  t = (jnp.zeros((B,)),) if isinstance(block, ViTTimeBlock) else ()
  return jax.jit(core.init_block, static_argnums=0)(block, jax.random.key(0), x, z, *t)


def _num_params(block, *inputs) -> int:
  shapes = jax.eval_shape(lambda k: core.init_block(block, k, *inputs), jax.random.key(0))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def _perturbed(variables, where: str, seed: int = 1, scale: float = 0.5):
  """The variables with noise added to every parameter whose path names `where`."""
  rs = np.random.RandomState(seed)

  def add(path, p):
    if any(where in str(getattr(k, "key", "")) for k in path):
      return p + scale * jnp.asarray(rs.normal(size=p.shape), p.dtype)
    return p

  return jax.tree_util.tree_map_with_path(add, variables)


def _differ(a, b) -> bool:
  return float(jnp.abs(a - b).max()) > 1e-3


def test_parameter_counts_by_hand():
  x, z = jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 10))
  t = jnp.zeros((1,))
  w, d, m, t_dim = 64, 10, 10, 64
  # The default convolutional stem, patch 8: 3x3 convs 1 -> 32 -> 32 -> 64 channels, each
  # of stride 2, so 28 -> 14 -> 7 -> 4: a 4 x 4 grid of tokens.
  stem = (9 * 1 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * w + w)
  label = (d * w + w) + w  # the label token's Dense and position
  attention = 4 * (w * w + w)  # query, key, value, out
  mlp = (w * 2 * w + 2 * w) + (2 * w * w + w)
  layer_norms = 2 * (2 * w)
  rest = 2 * (layer_norms + attention + mlp) + 2 * w + (w * m + m)  # 2 layers, norm, head
  vit = stem + 4 * 4 * w + label + rest
  assert vit == 97_578
  assert _num_params(ViTBlock(10), x, z) == vit
  # The linear stem, patch 4: one Dense per 4 x 4 patch, 7 x 7 of them.
  linear = (4 * 4 * 1 * w + w) + 7 * 7 * w + label + rest
  assert linear == 72_714
  assert _num_params(ViTBlock(10, patch=4, stem="linear"), x, z) == linear
  # adaLN-Zero: LayerNorms lose their scale and bias; each layer gains a Dense to 6 * w
  # (shift, scale, gate of two branches), the final norm one to 2 * w, and t its MLP.
  adaln = 2 * (w * 6 * w + 6 * w) + (w * 2 * w + 2 * w)
  t_mlp = (t_dim * w + w) + (w * w + w)
  vit_time = vit - 2 * layer_norms - 2 * w + adaln + t_mlp
  assert vit_time == 163_498
  assert _num_params(ViTTimeBlock(10), x, z, t) == vit_time


def test_the_conv_stem_grid_rounds_up_and_the_linear_stem_needs_a_divisor():
  z = jnp.zeros((1, 10))
  for hw, patch, grid in (((28, 28), 8, 4 * 4), ((28, 28), 4, 7 * 7), ((32, 32), 4, 8 * 8),
                          ((30, 20), 2, 15 * 10), ((9, 9), 4, 3 * 3)):
    x = jnp.zeros((1, *hw, 3))
    shapes = jax.eval_shape(lambda k: core.init_block(ViTBlock(10, patch=patch), k, x, z),
                            jax.random.key(0))
    assert shapes["params"]["patch_pos"]["embedding"].shape == (grid, 64)
  with pytest.raises(ValueError, match="power of two"):
    blocks.check_patch((28, 28), 7, "conv")
  blocks.check_patch((28, 28), 7, "linear")
  with pytest.raises(ValueError, match="does not divide"):
    blocks.check_patch((28, 28), 8, "linear")


def test_shapes_and_a_scalar_t_serves_the_batch():
  x, z = _inputs()
  block = ViTBlock(10)
  assert not core.has_split(block)
  out, _ = _apply(block, _variables(block), x, z)
  assert out.shape == (B, 10) and out.dtype == jnp.float32

  block = ViTTimeBlock(10)
  assert not core.has_split(block)
  variables = _perturbed(_perturbed(_variables(block), "adaln"), "final_mod", seed=2)
  per_row, _ = _apply(block, variables, x, z, jnp.full((B,), 0.3))
  shared, _ = _apply(block, variables, x, z, jnp.float32(0.3))
  assert per_row.shape == shared.shape == (B, 10) and shared.dtype == jnp.float32
  np.testing.assert_allclose(shared, per_row, rtol=1e-4, atol=1e-4)


def test_adaln_zero_starts_independent_of_t_until_its_parameters_move():
  x, z = _inputs()
  block = ViTTimeBlock(10)
  variables = _variables(block)
  at = lambda v, t, x=x: _apply(block, v, x, z, jnp.full((B,), t))[0]
  np.testing.assert_array_equal(at(variables, 0.1), at(variables, 0.9))
  # Every residual branch is gated off: the image does not reach the label token either.
  np.testing.assert_array_equal(at(variables, 0.1), at(variables, 0.1, x=x[::-1]))
  moved = _perturbed(variables, "adaln")
  assert _differ(at(moved, 0.1), at(moved, 0.9))
  assert _differ(at(moved, 0.1), at(moved, 0.1, x=x[::-1]))
  final_only = _perturbed(variables, "final_mod")
  assert _differ(at(final_only, 0.1), at(final_only, 0.9))


def test_the_output_depends_on_the_label_and_on_the_image():
  (x, z), (x2, z2) = _inputs(), _inputs(seed=1)
  block = ViTBlock(10)
  out = lambda x, z: _apply(block, _variables(block), x, z)[0]
  assert _differ(out(x, z), out(x, z2))
  assert _differ(out(x, z), out(x2, z))
  # Each row's output is its own: attention mixes tokens within an image, not across the batch.
  np.testing.assert_allclose(out(x, z)[::-1], out(x[::-1], z[::-1]), rtol=1e-5, atol=1e-5)


def test_clear_errors():
  x, z = _inputs(shape=(28, 28, 1))
  with pytest.raises(ValueError, match=r"patch size 5 .* 28 x 28 .*\[1, 2, 4, 7, 14, 28\]"):
    jax.eval_shape(lambda k: core.init_block(ViTBlock(10, patch=5, stem="linear"), k, x, z),
                   jax.random.key(0))
  with pytest.raises(ValueError, match="patch size 5 with the convolutional stem.*power of two"):
    jax.eval_shape(lambda k: core.init_block(ViTBlock(10, patch=5), k, x, z), jax.random.key(0))
  with pytest.raises(ValueError, match="unknown ViT stem 'cnn'"):
    jax.eval_shape(lambda k: core.init_block(ViTBlock(10, stem="cnn"), k, x, z), jax.random.key(0))
  with pytest.raises(ValueError, match="width 30 must be divisible by .* heads 4"):
    jax.eval_shape(lambda k: core.init_block(ViTBlock(10, width=30, heads=4), k, x, z),
                   jax.random.key(0))
  for bad, match in ((dict(vit_heads=3), "divisible by vit_heads"), (dict(patch_size=0), "patch_size"),
                     (dict(vit_width=0), "vit_width"), (dict(vit_layers=0), "vit_layers"),
                     (dict(vit_dropout=1.0), r"vit_dropout must be in \[0, 1\)"),
                     (dict(vit_stem="patch"), r"unknown vit_stem 'patch'; choose one of \['conv', 'linear'\]")):
    with pytest.raises(ValueError, match=match):
      BlockConfig(block="vit", **bad)
  with pytest.raises(ValueError, match="patch size 3 with the convolutional stem"):
    blocks.make(BlockConfig(block="vit", patch_size=3), False, 10, (28, 28, 1))
  with pytest.raises(ValueError, match="patch size 3 does not divide"):
    blocks.make(BlockConfig(block="vit", patch_size=3, vit_stem="linear"), False, 10, (28, 28, 1))
  with pytest.raises(ValueError, match=r"vit block takes images \[H, W, C\].*block 'mlp'"):
    blocks.make(BlockConfig(block="vit"), False, 10, (64,))


def test_make_builds_the_configured_vit():
  cfg = BlockConfig(block="vit", patch_size=7, vit_width=32, vit_layers=3, vit_heads=8,
                    vit_dropout=0.1, dropout=0.3, vit_stem="linear")  # `dropout`: the other blocks'

  block = blocks.make(cfg, False, 5, (28, 28, 1))
  assert type(block) is ViTBlock
  assert (block.num_classes, block.patch, block.width, block.layers, block.heads, block.dropout,
          block.stem) == (5, 7, 32, 3, 8, 0.1, "linear")
  assert type(blocks.make(cfg, True, 5, (28, 28, 1))) is ViTTimeBlock
  assert type(blocks.make(BlockConfig(block="vit"), False, 10, (28, 28, 1))) is ViTBlock
  assert type(blocks.make(BlockConfig(block="vit"), True, 10, (28, 28, 1))) is ViTTimeBlock
  # Prototype embeddings: z is a vector of the input's size, which the label Dense reads.
  block = blocks.make(BlockConfig(block="vit"), False, 10, SMALL, prototype=True)
  x, z = _inputs(d=int(np.prod(SMALL)))
  out = jax.eval_shape(lambda k: core.apply(block, core.init_block(block, k, x, z), x, z)[0],
                       jax.random.key(0))
  assert out.shape == (B, 10)


def test_dropout_only_in_training():
  x, z = _inputs()
  block = ViTBlock(10, dropout=0.5)
  variables = _variables(ViTBlock(10))  # dropout has no parameters
  train = lambda k: _apply(block, variables, x, z, train=True, rng=jax.random.key(k))[0]
  assert _differ(train(1), train(2))
  np.testing.assert_array_equal(train(1), train(1))
  assert _differ(train(1), _apply(block, variables, x, z)[0])
  np.testing.assert_array_equal(_apply(block, variables, x, z)[0], _apply(block, variables, x, z)[0])


@pytest.mark.parametrize("method", library_methods())
def test_every_method_takes_the_vit_block(method):
  """Each method builds it with its own signature (and output size) and traces a training
  step and inference on it: shapes only, nothing compiled."""
  kw = {"T": 2} if "T" in config.method_settings(method) else {}
  cfg = RunConfig.create(method, block="vit", **kw)
  compute, model = build(cfg)
  assert isinstance(model.block, ViTTimeBlock if methods.get(method).time_conditioned else ViTBlock)
  mod = methods.get(method)
  state = jax.eval_shape(lambda: trainer.init_state(cfg, model, jax.random.key(0)))
  x, y = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.uint8), jax.ShapeDtypeStruct((4,), jnp.int32)
  _, m = jax.eval_shape(functools.partial(mod.train_step, model, cfg.train.optim, compute), state, x, y)
  assert m["loss"].shape == () and m["loss"].dtype == jnp.float32
  counts = jax.eval_shape(lambda s, x, y: mod.eval_counts(model, compute, s, x, y, jax.random.key(0), 2),
                          state, x, y)
  assert counts[0].shape == () and counts[1].shape == (2,)


def test_noprop_dt_learns_the_digits_with_vit_blocks(tmp_path, digits):
  cfg = RunConfig.create("dt", block="vit", patch_size=2, T=2, epochs=3, inference_runs=1)
  s = trainer.train(cfg, tmp_path, dataset=digits, progress=False, print_fn=lambda _: None)
  assert s["test_accuracy"] > 0.5, s["test_accuracy"]  # 0.67 on XLA:CPU; chance is 0.1
