"""A 2-D convolution whose weight gradient is a plain matmul.

XLA:CPU emits the weight gradient of a convolution very slowly when the
convolution sits under `jax.vmap` (a batch-group-count convolution) or inside a
loop body, far slower than the same product as a GEMM (the documentation's
performance page has the figures). `conv2d` keeps the stock forward convolution, writes
the input gradient as a forward convolution too (see `_bwd`) and the weight
gradient as `patches^T @ grad_out`, which XLA turns into one GEMM (a batched
GEMM under `vmap`). Mathematically it is the same function with the same
gradient.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def conv_xla(x_NHWC: jax.Array, w_HWIO: jax.Array, padding: str, stride: int = 1) -> jax.Array:
  """The stock convolution, NHWC x HWIO -> NHWC (XLA's own gradients)."""
  return lax.conv_general_dilated(x_NHWC, w_HWIO, (stride, stride), padding, dimension_numbers=_DN)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x_NHWC: jax.Array, w_HWIO: jax.Array, padding: str) -> jax.Array:
  """Stride-1 convolution, NHWC x HWIO -> NHWC, `padding` 'VALID' or 'SAME'."""
  return conv_xla(x_NHWC, w_HWIO, padding)


def _fwd(x, w, padding):
  return conv_xla(x, w, padding), (x, w)


def _bwd(padding, res, g_NHWO):
  x, w = res
  kh, kw, c, o = w.shape
  # The input gradient as a forward convolution of the gradient with the flipped kernel,
  # its in/out channels swapped: XLA:CPU runs that through its convolution library, where
  # JAX's own transposed convolution (kernel dims 01oi) gets XLA's generic loop.
  pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), _pads(padding, kh, kw))]
  dx = lax.conv_general_dilated(g_NHWO.astype(x.dtype), jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2),
                                (1, 1), pads, dimension_numbers=_DN)
  # Patches are ordered channel-major: feature index = c * kh * kw + i * kw + j.
  p_NHWP = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), padding, dimension_numbers=_DN)
  dw_PO = jnp.einsum("nhwp,nhwo->po", p_NHWP, g_NHWO.astype(p_NHWP.dtype))
  dw = dw_PO.reshape(c, kh, kw, o).transpose(1, 2, 0, 3).astype(w.dtype)
  return dx, dw


conv2d.defvjp(_fwd, _bwd)


# ----------------------------------------------------------------------------- im2col + GEMM

def im2col(x_NHWC: jax.Array, k: int = 3) -> jax.Array:
  """VALID k x k patches [N, H-k+1, W-k+1, k*k*C], feature index (i * k + j) * C + c.

  The k*k shifted slices stacked on a new axis: XLA:CPU fuses x's producer (bias,
  ReLU, dropout) into this copy as plain strided loops, where a gather fused with
  them ran several times slower than the gather alone; and
  `conv_general_dilated_patches` is itself a (slower) convolution. (Writing the slices
  into one buffer in place was 3x faster alone, but slower inside a training step.)
  """
  n, h, w, c = x_NHWC.shape
  ho, wo = h - k + 1, w - k + 1
  slices = [x_NHWC[:, i:i + ho, j:j + wo, :] for i in range(k) for j in range(k)]
  return jnp.stack(slices, axis=3).reshape(n, ho, wo, k * k * c)


def col2im(p_NHWP: jax.Array, k: int = 3) -> jax.Array:
  """The transpose of `im2col`: [N, Ho, Wo, k*k*C] -> [N, Ho+k-1, Wo+k-1, C], each patch
  feature added back to the pixel it was cut from (k*k shifted, zero-padded adds that XLA
  fuses into one pass)."""
  n, ho, wo, kkc = p_NHWP.shape
  p = p_NHWP.reshape(n, ho, wo, k * k, kkc // (k * k))
  pad = lambda a, i, j: jnp.pad(a, ((0, 0), (i, k - 1 - i), (j, k - 1 - j), (0, 0)))
  return sum(pad(p[:, :, :, i * k + j], i, j) for i in range(k) for j in range(k))


def _pads(padding: str, *ks: int) -> list[tuple[int, int]]:
  """(low, high) padding of each spatial dim for a stride-1 kernel of sides `ks`."""
  if padding not in ("VALID", "SAME"):
    raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
  return [(0, 0) if padding == "VALID" else ((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks]


def pad_same(x_NHWC: jax.Array, k: int, padding: str) -> jax.Array:
  if padding == "VALID":
    return x_NHWC
  return jnp.pad(x_NHWC, ((0, 0), *_pads(padding, k, k), (0, 0)))


def _gemm_forward(x, w, padding):
  kh, kw, c, o = w.shape
  p_NHWP = im2col(pad_same(x, kh, padding), kh)
  return p_NHWP @ w.reshape(kh * kw * c, o), p_NHWP


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_gemm(x_NHWC: jax.Array, w_HWIO: jax.Array, padding: str) -> jax.Array:
  """`conv2d` computed as im2col + GEMM, forward and weight gradient.

  On XLA:CPU the stock convolution and its weight gradient run far below the
  machine's GEMM speed, while these plain GEMMs reach it: this halves the time of a
  block's convolutions. The patches are kept for the weight gradient (more
  residual memory than `conv2d`); the input gradient is a GEMM too, folded back to
  pixels by `col2im`. Square kernels only.
  """
  return _gemm_forward(x_NHWC, w_HWIO, padding)[0]


def _gemm_fwd(x, w, padding):
  y, p = _gemm_forward(x, w, padding)
  return y, (x, p, w)


def _gemm_bwd(padding, res, g_NHWO):
  x, p_NHWP, w = res
  kh, kw, c, o = w.shape
  # 2-D operands: a 3-contracting-dim einsum here runs several times slower on XLA:CPU.
  p_MP = p_NHWP.reshape(-1, p_NHWP.shape[-1])
  g_MO = g_NHWO.reshape(-1, o).astype(p_MP.dtype)
  dw = lax.dot_general(p_MP, g_MO, (((0,), (0,)), ((), ())))
  # The input gradient as the patches' gradient (a GEMM) folded back by col2im: faster on
  # XLA:CPU than its transposed convolution, which does not use the GEMM library.
  dp_MP = g_MO @ w.reshape(kh * kw * c, o).astype(p_MP.dtype).T
  dx = col2im(dp_MP.reshape(p_NHWP.shape), kh)
  if padding == "SAME":
    lo = (kh - 1) // 2
    dx = dx[:, lo:lo + x.shape[1], lo:lo + x.shape[2]]
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


conv2d_gemm.defvjp(_gemm_fwd, _gemm_bwd)
