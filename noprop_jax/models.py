"""The NoProp-DT block (paper Figure 6), the linear head and class embeddings.

Parameter counts match the paper's Table 5 exactly when convolutions are
unpadded and pooling floors: 919,946 (MNIST), 1,215,434 (CIFAR-10),
1,250,084 (CIFAR-100), BatchNorm scale and bias counted.
"""

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from noprop_jax.conv import conv2d

ConvImpl = Literal["xla", "patches"]


class Conv(nn.Module):
  """3x3 stride-1 convolution with a choice of weight-gradient implementation."""

  features: int
  padding: str = "VALID"
  impl: ConvImpl = "xla"

  @nn.compact
  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    c = x_NHWC.shape[-1]
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    if self.impl == "patches":
      y = conv2d(x_NHWC, w, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
          x_NHWC, w, (1, 1), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b[None, None, None, :]


def _bn(train: bool) -> nn.BatchNorm:
  # momentum 0.9 in Flax is PyTorch's default momentum 0.1.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class ImagePath(nn.Module):
  """conv32-pool-conv64-conv128-pool (ReLU, dropout after each) -> FC256 -> BN."""

  padding: str = "VALID"
  dropout: float = 0.2
  conv_impl: ConvImpl = "xla"

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, train: bool) -> jax.Array:
    h = x_BHWC
    for features, pool in ((32, True), (64, False), (128, True)):
      h = nn.relu(Conv(features, self.padding, self.conv_impl)(h))
      if pool:
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")  # floors odd sizes
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = h.reshape(h.shape[0], -1)
    return _bn(train)(nn.Dense(256)(h))


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


class DTBlock(nn.Module):
  """One NoProp-DT denoising block: (x, z_{t-1}) -> class logits.

  `features` (the image pathway) does not depend on z, so inference computes it
  once per image and block and then runs only `logits_from_features` per step.
  """

  num_classes: int
  padding: str = "VALID"
  dropout: float = 0.2
  conv_impl: ConvImpl = "xla"

  def setup(self):
    self.image = ImagePath(self.padding, self.dropout, self.conv_impl)
    self.label = LabelPath()
    self.fuse = FuseHead(self.num_classes)

  def __call__(self, x_BHWC: jax.Array, z_BD: jax.Array, train: bool) -> jax.Array:
    return self.fuse(self.image(x_BHWC, train), self.label(z_BD, train), train)

  def features(self, x_BHWC: jax.Array, train: bool) -> jax.Array:
    return self.image(x_BHWC, train)

  def logits_from_features(self, img_BF: jax.Array, z_BD: jax.Array, train: bool) -> jax.Array:
    return self.fuse(img_BF, self.label(z_BD, train), train)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def init_embedding(key: jax.Array, num_classes: int, dim: int) -> jax.Array:
  """Learned class embedding [m, d]: orthonormal rows when d >= m, else columns."""
  return nn.initializers.orthogonal()(key, (num_classes, dim), jnp.float32)
