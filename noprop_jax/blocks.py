"""Provided blocks: the paper's (Figure 6), MLPs for vectors, and a small ViT for images;
`make` picks one by name.

Any Flax module with a method's signature can be a block (see `core`); these
are the provided ones. The paper's and the MLP blocks split themselves into `features`
(the pathway that ignores z and t) and `from_features`, so inference runs that pathway
once. The ViT blocks (`ViTBlock`, `ViTTimeBlock`: z is a token that attention mixes with
the image's patches, t conditions every layer through adaLN-Zero) have no such pathway.

Parameter counts of the paper's blocks match the paper's Table 5 exactly when convolutions are
unpadded and pooling floors. DT: 919,946 (MNIST), 1,215,434 (CIFAR-10),
1,250,084 (CIFAR-100), BatchNorm scale and bias counted. CT/FM: 867,722
(MNIST), 1,163,210 (CIFAR-10). With prototype embeddings (z reshaped to an
image through its own copy of the image pathway): DT 1,401,738 (MNIST),
1,992,714 (CIFAR-10); CT 1,482,122 (MNIST).
"""

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from noprop_jax import sharding
from noprop_jax.conv import conv2d, conv2d_gemm, conv_xla, pad_same
from noprop_jax.dropout import Dropout
from noprop_jax.setting import setting

ConvImpl = Literal["xla", "patches", "gemm"]


class Conv(nn.Module):
  """3x3 stride-1 convolution with a choice of weight-gradient implementation, and with
  `pool` a 2x2 max-pool between the convolution and the bias: max_pool(conv(x)) + b,
  which is max_pool(conv(x) + b), the bias being constant over each window. On a mesh's
  'data' axis each device convolves its own examples (`sharding.per_example`)."""

  features: int
  padding: str = "VALID"
  impl: ConvImpl = "xla"
  pool: bool = False
  stride: int = 1  # > 1: the stock convolution only

  @nn.compact
  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    c = x_NHWC.shape[-1]
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    x_NHWC, padding = crop_for_pool(x_NHWC, self.padding) if self.pool else (x_NHWC, self.padding)
    if self.stride != 1 and self.impl != "xla":
      raise ValueError(f"conv impl {self.impl!r} is stride 1 only; got stride {self.stride}")
    conv = {"patches": conv2d, "gemm": conv2d_gemm,
            "xla": lambda x, w, padding: conv_xla(x, w, padding, self.stride)}[self.impl]
    y = sharding.per_example(lambda x, w: conv(x, w, padding))(x_NHWC, w)
    return (max_pool_2x2(y) if self.pool else y) + b[None, None, None, :]


def crop_for_pool(x_NHWC: jax.Array, padding: str) -> tuple[jax.Array, str]:
  """(x, padding) for a 3x3 convolution whose output a floored 2x2 pool takes: where that
  output would have an odd height or width, x loses its last row or column (padded first,
  for 'SAME'), so the convolution never computes the row or column the pool drops. The
  same function and gradient; the paper's MNIST block saves a fifth of its largest
  convolution (9x9 -> 8x8 outputs)."""
  _, h, w, _ = x_NHWC.shape
  out_h, out_w = (h, w) if padding == "SAME" else (h - 2, w - 2)
  if out_h % 2 == 0 and out_w % 2 == 0:
    return x_NHWC, padding
  x_NHWC = pad_same(x_NHWC, 3, padding)
  _, h, w, _ = x_NHWC.shape
  return x_NHWC[:, :h - out_h % 2, :w - out_w % 2], "VALID"


@jax.custom_vjp
def max_pool_2x2(x_BHWC: jax.Array) -> jax.Array:
  """2x2 stride-2 max pooling, flooring odd sizes (= `nn.max_pool(x, (2, 2), (2, 2))`).

  Written as a reshape and a max, with the gradient of `nn.max_pool`: each window's
  gradient goes to its first maximum (row-major). XLA:CPU runs `nn.max_pool`'s
  select-and-scatter gradient an order of magnitude slower, and the generic gradient
  of a max (which splits ties and so needs a count and a division per window) needs
  several passes where this takes one elementwise pass.
  """
  return _windows(x_BHWC).max(axis=(2, 4))


def _windows(x_BHWC: jax.Array) -> jax.Array:
  b, h, w, c = x_BHWC.shape
  return x_BHWC[:, :2 * (h // 2), :2 * (w // 2)].reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x_BHWC):
  y = max_pool_2x2(x_BHWC)
  return y, (x_BHWC, y)


def _max_pool_bwd(res, g):
  x, y = res
  hit = _windows(x) == y[:, :, None, :, None, :]
  first = jnp.zeros_like(hit[:, :, 0, :, 0])
  picks = []
  for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):  # window order
    picks.append(hit[:, :, i, :, j] & ~first)
    first = first | picks[-1]
  pick = jnp.stack([jnp.stack(picks[:2], -2), jnp.stack(picks[2:], -2)], 2)
  b, h, w, c = x.shape
  gx = jnp.where(pick, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  gx = gx.reshape(b, 2 * (h // 2), 2 * (w // 2), c)
  return (jnp.pad(gx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _bn(train: bool) -> nn.BatchNorm:
  # momentum 0.9 in Flax is PyTorch's default momentum 0.1.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class ImagePath(nn.Module):
  """conv32-pool-conv64-conv128-pool (ReLU, dropout after each) -> FC256 -> BN
  (discrete time), or -> FC256 -> ReLU (continuous time, `batchnorm=False`).

  Each pool is taken before its bias and ReLU, which commute with it (max_pool(relu(y +
  b)) = relu(max_pool(y) + b)): the same function, with the bias, the ReLU and their
  gradients on a quarter of the elements."""

  padding: str = "VALID"
  dropout: float = 0.2
  conv_impl: ConvImpl = "xla"
  batchnorm: bool = True

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, train: bool) -> jax.Array:
    h = x_BHWC
    for features, pool in ((32, True), (64, False), (128, True)):
      h = nn.relu(Conv(features, self.padding, self.conv_impl, pool)(h))
      h = Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Dense(256)(h.reshape(h.shape[0], -1))
    return _bn(train)(h) if self.batchnorm else nn.relu(h)


class LabelPath(nn.Module):
  """FC256-BN-ReLU (h1) -> FC256-BN-ReLU -> FC256-BN, plus h1."""

  @nn.compact
  def __call__(self, z_BD: jax.Array, train: bool) -> jax.Array:
    h1 = nn.relu(_bn(train)(nn.Dense(256)(z_BD)))
    h = nn.relu(_bn(train)(nn.Dense(256)(h1)))
    return _bn(train)(nn.Dense(256)(h)) + h1


class FuseHead(nn.Module):
  """concat(512) -> FC256-BN-ReLU -> FC128-BN-ReLU -> FC num_classes."""

  num_classes: int

  @nn.compact
  def __call__(self, img_BF: jax.Array, lab_BF: jax.Array, train: bool) -> jax.Array:
    h = jnp.concatenate([img_BF, lab_BF], axis=-1)
    h = nn.relu(_bn(train)(nn.Dense(256)(h)))
    h = nn.relu(_bn(train)(nn.Dense(128)(h)))
    return nn.Dense(self.num_classes)(h)


def _as_images(z_BD: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  if z_BD.shape[-1] != math.prod(shape):
    raise ValueError(f"a prototype label of dimension {z_BD.shape[-1]} cannot be reshaped "
                     f"to images of shape {shape}")
  return z_BD.reshape(z_BD.shape[0], *shape)


class DTBlock(nn.Module):
  """One NoProp-DT denoising block: (x, z_{t-1}) -> class logits.

  `features` (the image pathway) does not depend on z, so inference computes it
  once per image and block and then runs only `from_features` per step.
  With `prototype_shape` (prototype embeddings, d = H * W * C) the noisy label
  is reshaped to an image and goes through its own copy of the image pathway
  instead of `LabelPath`.
  """

  num_classes: int
  padding: str = "VALID"
  dropout: float = 0.2
  conv_impl: ConvImpl = "xla"
  prototype_shape: tuple[int, int, int] | None = None

  def setup(self):
    self.image = ImagePath(self.padding, self.dropout, self.conv_impl)
    if self.prototype_shape is None:
      self.label = LabelPath()
    else:
      self.label = ImagePath(self.padding, self.dropout, self.conv_impl)
    self.fuse = FuseHead(self.num_classes)

  def _label(self, z_BD, train):
    if self.prototype_shape is None:
      return self.label(z_BD, train)
    return self.label(_as_images(z_BD, self.prototype_shape), train)

  def __call__(self, x_BHWC: jax.Array, z_BD: jax.Array, train: bool) -> jax.Array:
    return self.fuse(self.image(x_BHWC, train), self._label(z_BD, train), train)

  def features(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    return self.image(x_BHWC, train)

  def from_features(self, img_BF: jax.Array, z_BD: jax.Array, train: bool = False) -> jax.Array:
    return self.fuse(img_BF, self._label(z_BD, train), train)


def sinusoidal_embedding(t_B: jax.Array, dim: int = 64, scale: float = 1000.0,
                         max_period: float = 10_000.0) -> jax.Array:
  """Transformer position embedding of t * scale: [sin(t w_k), cos(t w_k)], k < dim / 2,
  with w_k = scale * max_period^(-k / (dim / 2)). Scaling t in [0, 1] to [0, 1000]
  (DDPM's step index) gives the fastest frequencies resolution near 1e-3. Computed in
  float32 (t in bfloat16 would lose that resolution); cast the result, in [-1, 1], to the
  compute dtype."""
  half = dim // 2
  w = scale * jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  arg = t_B.astype(jnp.float32)[..., None] * w.reshape((1,) * t_B.ndim + w.shape)
  return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class CTBlock(nn.Module):
  """The continuous-time block of NoProp-CT and NoProp-FM: (x, z_t, t) -> logits.

  Image pathway (FC256 -> ReLU, no BatchNorm), z_t -> FC256 -> ReLU, and a
  sinusoidal embedding of t (64) -> FC256 -> ReLU, concatenated (768) ->
  FC256 -> ReLU -> FC128 -> ReLU -> FC m.

  The first fused layer is linear in the concatenation, so
  concat(h_x, h_z, h_t) @ K = h_x @ K_x + h_z @ K_z + h_t @ K_t. `features`
  computes h_x @ K_x + bias once per image (the conv tower is most of the
  block's FLOPs); `from_features` is the cheap rest, run at every solver step.
  `__call__` is the plain evaluation of the whole block.
  With `prototype_shape`, z_t is reshaped to an image and goes through its own
  copy of the image pathway in place of FC256 -> ReLU.
  """

  num_classes: int
  padding: str = "VALID"
  dropout: float = 0.2
  conv_impl: ConvImpl = "xla"
  t_dim: int = 64
  prototype_shape: tuple[int, int, int] | None = None

  def setup(self):
    self.image = ImagePath(self.padding, self.dropout, self.conv_impl, batchnorm=False)
    if self.prototype_shape is None:
      self.z_fc = nn.Dense(256)
    else:
      self.z_image = ImagePath(self.padding, self.dropout, self.conv_impl, batchnorm=False)
    self.t_fc = nn.Dense(256)
    self.fuse_kernel = self.param("fuse_kernel", nn.initializers.lecun_normal(), (3 * 256, 256))
    self.fuse_bias = self.param("fuse_bias", nn.initializers.zeros, (256,))
    self.fc2 = nn.Dense(128)
    self.out = nn.Dense(self.num_classes)

  def _z_t_features(self, z_BD, t_B, train=False):
    h_t = nn.relu(self.t_fc(sinusoidal_embedding(t_B, self.t_dim).astype(z_BD.dtype)))
    if self.prototype_shape is None:
      return nn.relu(self.z_fc(z_BD)), h_t
    return self.z_image(_as_images(z_BD, self.prototype_shape), train), h_t

  def _tail(self, pre_B256):
    return self.out(nn.relu(self.fc2(nn.relu(pre_B256))))

  def __call__(self, x_BHWC: jax.Array, z_BD: jax.Array, t_B: jax.Array, train: bool) -> jax.Array:
    h_z, h_t = self._z_t_features(z_BD, t_B, train)
    h_t = jnp.broadcast_to(h_t, h_z.shape)  # a scalar t serves the whole batch
    h = jnp.concatenate([self.image(x_BHWC, train), h_z, h_t], axis=-1)
    return self._tail(h @ self.fuse_kernel + self.fuse_bias[None, :])

  def features(self, x_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """h_x @ K_x + bias: [B, 256]; independent of z and t."""
    return self.image(x_BHWC, train) @ self.fuse_kernel[:256] + self.fuse_bias[None, :]

  def from_features(self, img_B256: jax.Array, z_BD: jax.Array, t_B: jax.Array) -> jax.Array:
    """The block's logits given `features`; t may be [B] or a scalar shared by the batch."""
    h_z, h_t = self._z_t_features(z_BD, t_B)
    h_t = h_t if h_t.ndim == h_z.ndim else h_t[None, :]
    pre = img_B256 + h_z @ self.fuse_kernel[256:512] + h_t @ self.fuse_kernel[512:]
    return self._tail(pre)


# ----------------------------------------------------------------------------- MLP blocks

class MLPBlock(nn.Module):
  """A NoProp-DT / backprop block for inputs of any shape (flattened): (x, z) -> logits.

  x -> [Dense-ReLU-dropout] x depth (`features`, independent of z); z -> Dense-ReLU;
  both concatenated -> Dense-ReLU -> Dense m (`from_features`).
  """

  num_classes: int
  hidden: int = 256
  depth: int = 2
  dropout: float = 0.0

  def setup(self):
    self.x_layers = [nn.Dense(self.hidden) for _ in range(self.depth)]
    self.drop = Dropout(self.dropout)
    self.z_layer = nn.Dense(self.hidden)
    self.mix = nn.Dense(self.hidden)
    self.out = nn.Dense(self.num_classes)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for layer in self.x_layers:
      h = self.drop(nn.relu(layer(h)), deterministic=not train)
    return h

  def from_features(self, h_BF: jax.Array, z_BD: jax.Array, train: bool = False) -> jax.Array:
    h = jnp.concatenate([h_BF, nn.relu(self.z_layer(z_BD))], axis=-1)
    return self.out(nn.relu(self.mix(h)))

  def __call__(self, x: jax.Array, z_BD: jax.Array, train: bool = False) -> jax.Array:
    return self.from_features(self.features(x, train), z_BD, train)


class MLPTimeBlock(MLPBlock):
  """A NoProp-CT / -FM / adjoint block for inputs of any shape: (x, z, t) -> logits.

  As `MLPBlock`, with a sinusoidal embedding of t -> Dense-ReLU concatenated to the
  input and label pathways. In `from_features` t may be a scalar shared by the batch.
  """

  t_dim: int = 64

  def setup(self):
    super().setup()
    self.t_layer = nn.Dense(self.hidden)

  def from_features(self, h_BF: jax.Array, z_BD: jax.Array, t: jax.Array,
                    train: bool = False) -> jax.Array:
    h_t = nn.relu(self.t_layer(sinusoidal_embedding(t, self.t_dim).astype(z_BD.dtype)))
    h_t = jnp.broadcast_to(h_t, (z_BD.shape[0], self.hidden))  # a scalar t serves the batch
    h = jnp.concatenate([h_BF, nn.relu(self.z_layer(z_BD)), h_t], axis=-1)
    return self.out(nn.relu(self.mix(h)))

  def __call__(self, x: jax.Array, z_BD: jax.Array, t_B: jax.Array,
               train: bool = False) -> jax.Array:
    return self.from_features(self.features(x, train), z_BD, t_B, train)


# ----------------------------------------------------------------------------- ViT blocks

def check_patch(image_HW: tuple[int, ...], patch: int, stem: str = "linear") -> None:
  """'linear': patches are non-overlapping and cover the image, so the patch side must
  divide H and W. 'conv': the stem halves the grid log2(patch) times, so the patch side
  must be a power of two (any image size; the grid rounds up)."""
  if stem == "conv":
    if patch < 2 or patch & (patch - 1):
      raise ValueError(f"patch size {patch} with the convolutional stem: it must be a power of "
                       "two >= 2 (the stem is log2(patch) stride-2 convolutions), e.g. 4 or 8; "
                       "or choose the linear stem")
    return
  h, w = image_HW
  if h % patch or w % patch:
    g = math.gcd(h, w)
    fits = [d for d in range(1, g + 1) if g % d == 0]
    raise ValueError(f"patch size {patch} does not divide images of {h} x {w} pixels; choose a "
                     f"patch size that divides both, one of {fits}")


def patchify(x_BHWC: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H / p) * (W / p), p * p * C]: row-major patches, each flattened."""
  b, h, w, c = x_BHWC.shape
  check_patch((h, w), patch)
  x = x_BHWC.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ConvStem(nn.Module):
  """Image -> tokens [B, L, width] by log2(patch) 3x3 stride-2 convolutions (GELU between,
  width / 2 channels until the last), as in "Early convolutions help transformers see
  better": a grid of ceil(H / patch) x ceil(W / patch) tokens, each seeing an overlapping
  window. A small ViT learns much faster from it than from linearly embedded patches."""

  patch: int
  width: int

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    n = self.patch.bit_length() - 1
    h = x_BHWC
    for i in range(n):
      last = i == n - 1
      h = Conv(self.width if last else max(1, self.width // 2), "SAME", stride=2,
               name=f"conv{i}")(h)
      h = h if last else nn.gelu(h)
    return h.reshape(h.shape[0], -1, self.width)


class AddPosition(nn.Module):
  """A learned position embedding added to tokens [B, L, W], sized by the first call."""

  @nn.compact
  def __call__(self, h_BLF: jax.Array) -> jax.Array:
    pos_LF = self.param("embedding", nn.initializers.normal(0.02), h_BLF.shape[1:])
    return h_BLF + pos_LF[None]


def _modulate(h_BLF: jax.Array, shift_BF: jax.Array, scale_BF: jax.Array) -> jax.Array:
  return h_BLF * (1 + scale_BF[:, None, :]) + shift_BF[:, None, :]


class TransformerLayer(nn.Module):
  """Pre-LayerNorm self-attention and GELU MLP, each a residual branch with dropout.

  With a conditioning vector c (`__call__`'s c_BF), DiT's adaLN-Zero: the LayerNorms
  have no scale or bias of their own; shift, scale and a gate of each branch come from a
  zero-initialised Dense on SiLU(c), so every branch starts gated off."""

  width: int
  heads: int
  mlp_ratio: int = 2
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h_BLF: jax.Array, c_BF: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    adaptive = c_BF is not None
    if adaptive:
      mod = nn.Dense(6 * self.width, kernel_init=nn.initializers.zeros, name="adaln")(nn.silu(c_BF))
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    drop = Dropout(self.dropout, deterministic=not train)
    norm = lambda name: nn.LayerNorm(use_bias=not adaptive, use_scale=not adaptive, name=name)

    a = norm("norm_attn")(h_BLF)
    a = _modulate(a, shift1, scale1) if adaptive else a
    a = nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.width,
                                        out_features=self.width, name="attn")(a, a)
    a = drop(a)
    h_BLF = h_BLF + (gate1[:, None, :] * a if adaptive else a)

    m = norm("norm_mlp")(h_BLF)
    m = _modulate(m, shift2, scale2) if adaptive else m
    m = nn.gelu(nn.Dense(self.width * self.mlp_ratio, name="mlp_in")(m))
    m = drop(nn.Dense(self.width, name="mlp_out")(m))
    return h_BLF + (gate2[:, None, :] * m if adaptive else m)


class ViTBlock(nn.Module):
  """A small Vision Transformer block for images: (x, z) -> logits.

  Image tokens with learned positions, from the convolutional stem (`stem='conv'`, a
  ceil(H / patch) x ceil(W / patch) grid) or from non-overlapping patch x patch patches
  embedded by one Dense (`stem='linear'`, the original ViT); the noisy label
  z -> Dense(width) is the first token in place of a CLS token, and the logits are read
  from it after `layers` pre-LN transformer layers and a final LayerNorm. Attention mixes
  the label token with the image tokens, so no pathway is independent of z: there is no
  `features` / `from_features` split.
  """

  num_classes: int
  patch: int = 8
  width: int = 64
  layers: int = 2
  heads: int = 4
  mlp_ratio: int = 2
  dropout: float = 0.0
  stem: str = "conv"

  adaptive = False  # adaLN-Zero conditioning (`ViTTimeBlock`); not a field

  def setup(self):
    if self.width % self.heads:
      raise ValueError(f"the ViT's width {self.width} must be divisible by its number of "
                       f"attention heads {self.heads}")
    if self.stem not in STEMS:
      raise ValueError(f"unknown ViT stem {self.stem!r}; choose one of {list(STEMS)}")
    self.patch_embed = (ConvStem(self.patch, self.width) if self.stem == "conv"
                        else nn.Dense(self.width))
    self.patch_pos = AddPosition()
    self.label_embed = nn.Dense(self.width)
    self.label_pos = AddPosition()
    self.stack = [TransformerLayer(self.width, self.heads, self.mlp_ratio, self.dropout)
                  for _ in range(self.layers)]
    self.norm = nn.LayerNorm(use_bias=not self.adaptive, use_scale=not self.adaptive)
    self.head = nn.Dense(self.num_classes)

  def _tokens(self, x_BHWC: jax.Array, z_BD: jax.Array) -> jax.Array:
    """[B, 1 + patches, width]: the label token, then the image's."""
    if self.stem == "conv":
      check_patch(x_BHWC.shape[1:3], self.patch, self.stem)
      img_BLF = self.patch_pos(self.patch_embed(x_BHWC))
    else:
      img_BLF = self.patch_pos(self.patch_embed(patchify(x_BHWC, self.patch)))
    lab_B1W = self.label_pos(self.label_embed(z_BD)[:, None, :])
    return jnp.concatenate([lab_B1W, img_BLF], axis=1)

  def __call__(self, x_BHWC: jax.Array, z_BD: jax.Array, train: bool = False) -> jax.Array:
    h_BLF = self._tokens(x_BHWC, z_BD)
    for layer in self.stack:
      h_BLF = layer(h_BLF, None, train)
    return self.head(self.norm(h_BLF[:, 0]))


class ViTTimeBlock(ViTBlock):
  """`ViTBlock` conditioned on t: (x, z, t) -> logits, t of shape [B] or a scalar.

  c = Dense-SiLU-Dense of t's sinusoidal embedding drives adaLN-Zero in every layer and
  in the final norm (shift and scale, zero-initialised). At initialisation every
  residual branch is gated off and the output does not depend on t (nor on x): the
  gates learn first, as in DiT.
  """

  t_dim: int = 64

  adaptive = True

  def setup(self):
    super().setup()
    self.t_embed = nn.Dense(self.width)
    self.t_mix = nn.Dense(self.width)
    self.final_mod = nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros)

  def __call__(self, x_BHWC: jax.Array, z_BD: jax.Array, t_B: jax.Array,
               train: bool = False) -> jax.Array:
    h_BLF = self._tokens(x_BHWC, z_BD)
    e = sinusoidal_embedding(jnp.asarray(t_B), self.t_dim).astype(h_BLF.dtype)
    c = self.t_mix(nn.silu(self.t_embed(e)))
    c_BF = jnp.broadcast_to(c, (h_BLF.shape[0], self.width))  # a scalar t serves the batch
    for layer in self.stack:
      h_BLF = layer(h_BLF, c_BF, train)
    shift_BF, scale_BF = jnp.split(self.final_mod(nn.silu(c_BF)), 2, axis=-1)
    h_BF = self.norm(h_BLF[:, 0]) * (1 + scale_BF) + shift_BF
    return self.head(h_BF)


# ----------------------------------------------------------------------------- by name

NAMES = ("paper", "mlp", "vit")
STEMS = ("conv", "linear")
CONV_IMPLS = ("auto", "xla", "patches", "gemm")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Which provided block, and its options."""

  block: str = setting(
      "paper", "paper (Figure 6, images) | mlp (inputs of any shape) | vit (images)")
  dropout: float = setting(
      0.2, "dropout rate (paper: after each conv; mlp: after each input layer)")
  conv_impl: str = setting("auto", "paper block's convolution: auto | xla | patches | gemm")
  hidden: int = setting(256, "mlp: width of every layer")
  depth: int = setting(2, "mlp: layers on the input before it meets z (and t)")
  patch_size: int = setting(
      8, "vit: pixels per token side (conv stem: a power of two; linear: divides H, W)")
  vit_stem: str = setting(
      "conv", "vit: image to tokens by stride-2 3x3 convs (conv) | one Dense per patch (linear)")
  vit_width: int = setting(64, "vit: token width")
  vit_layers: int = setting(2, "vit: transformer layers per block")
  vit_heads: int = setting(4, "vit: attention heads (must divide --vit-width)")
  vit_dropout: float = setting(0.0, "vit: dropout on the residual branches")

  def __post_init__(self):
    if self.block not in NAMES:
      raise ValueError(f"unknown block {self.block!r}; choose one of {list(NAMES)}")
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"unknown conv_impl {self.conv_impl!r}; choose one of {list(CONV_IMPLS)}")
    for name in ("dropout", "vit_dropout"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.vit_stem not in STEMS:
      raise ValueError(f"unknown vit_stem {self.vit_stem!r}; choose one of {list(STEMS)}")
    if self.hidden < 1 or self.depth < 0:
      raise ValueError(f"hidden must be >= 1 and depth >= 0, got {self.hidden}, {self.depth}")
    vit = dict(patch_size=self.patch_size, vit_width=self.vit_width,
               vit_layers=self.vit_layers, vit_heads=self.vit_heads)
    for name, value in vit.items():
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if self.vit_width % self.vit_heads:
      raise ValueError(f"vit_width {self.vit_width} must be divisible by vit_heads "
                       f"{self.vit_heads} (each head gets width / heads channels)")


def resolve_conv_impl(conv_impl: str, vmapped: bool, backend: str | None = None) -> str:
  """'auto' -> on XLA:CPU, im2col + GEMM ('gemm') for blocks computed one by one (unrolled,
  or one at a time in a loop), and the matmul weight gradient ('patches') for blocks
  vmapped together, where the GEMMs become batched ones and the stock convolution's
  weight gradient (a batch-group convolution) is very slow; on `backend` GPU/TPU
  (default: JAX's), the stock one."""
  if conv_impl != "auto":
    return conv_impl
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  return "patches" if vmapped else "gemm"


def padding_for(input_shape: tuple[int, ...]) -> str:
  """The paper's unpadded tower needs at least 14 x 14 inputs (8 -> 6 -> 3 -> 1 -> nothing
  for 8 x 8 digits): smaller images are padded ('SAME')."""
  return "VALID" if min(input_shape[:2]) >= 14 else "SAME"


def make(cfg: BlockConfig, time_conditioned: bool, num_classes: int,
         input_shape: tuple[int, ...], prototype: bool = False, vmapped: bool = False,
         backend: str | None = None) -> nn.Module:
  """The block `cfg` names, for (x, z) (or (x, z, t) when `time_conditioned`).

  `prototype`: z is a prototype embedding of the input's size, which the paper's blocks
  read as an image through their own copy of the image pathway (the MLP and ViT blocks
  read it as any vector). `vmapped`: several blocks run batched under vmap (picks the
  CPU convolution); resolved here, before tracing, for `backend` (default: JAX's).
  """
  if cfg.block == "mlp":
    cls = MLPTimeBlock if time_conditioned else MLPBlock
    return cls(num_classes, cfg.hidden, cfg.depth, cfg.dropout)
  if len(input_shape) != 3:
    raise ValueError(f"the {cfg.block} block takes images [H, W, C]; inputs of shape "
                     f"{tuple(input_shape)} need another block (e.g. block 'mlp')")
  if cfg.block == "vit":
    check_patch(input_shape[:2], cfg.patch_size, cfg.vit_stem)
    cls = ViTTimeBlock if time_conditioned else ViTBlock
    return cls(num_classes, cfg.patch_size, cfg.vit_width, cfg.vit_layers, cfg.vit_heads,
               dropout=cfg.vit_dropout, stem=cfg.vit_stem)
  cls = CTBlock if time_conditioned else DTBlock
  return cls(num_classes, padding_for(input_shape), cfg.dropout,
             resolve_conv_impl(cfg.conv_impl, vmapped, backend),
             prototype_shape=tuple(input_shape) if prototype else None)
