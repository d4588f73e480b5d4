"""A 2-D convolution whose weight gradient is a plain matmul.

XLA:CPU emits the weight gradient of a convolution very slowly when the
convolution sits under `jax.vmap` (a batch-group-count convolution) or inside a
loop body (DESIGN.md section 10: ~30x). `conv2d` keeps the stock forward and
input-gradient convolutions and writes the weight gradient as
`patches^T @ grad_out`, which XLA turns into one GEMM (a batched GEMM under
`vmap`). Mathematically it is the same function with the same gradient.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x_NHWC: jax.Array, w_HWIO: jax.Array, padding: str) -> jax.Array:
  return lax.conv_general_dilated(x_NHWC, w_HWIO, (1, 1), padding, dimension_numbers=_DN)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x_NHWC: jax.Array, w_HWIO: jax.Array, padding: str) -> jax.Array:
  """Stride-1 convolution, NHWC x HWIO -> NHWC, `padding` 'VALID' or 'SAME'."""
  return _conv(x_NHWC, w_HWIO, padding)


def _fwd(x, w, padding):
  return _conv(x, w, padding), (x, w)


def _bwd(padding, res, g_NHWO):
  x, w = res
  kh, kw, c, o = w.shape
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, padding), x)
  (dx,) = vjp_x(g_NHWO)
  # Patches are ordered channel-major: feature index = c * kh * kw + i * kw + j.
  p_NHWP = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), padding, dimension_numbers=_DN)
  dw_PO = jnp.einsum("nhwp,nhwo->po", p_NHWP, g_NHWO.astype(p_NHWP.dtype))
  dw = dw_PO.reshape(c, kh, kw, o).transpose(1, 2, 0, 3).astype(w.dtype)
  return dx, dw


conv2d.defvjp(_fwd, _bwd)
