"""Prototype class embeddings: each class's medoid training image (paper Table 4).

The prototype of class c is the training image of class c with the smallest
median Euclidean distance to the other images of class c. Distances are
computed a block of rows at a time ([rows, N_c] never [N_c, N_c]), so a
6,000-image MNIST class needs a few MB instead of 144 MB.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnames="n")
def _median_distances(rows_RD: jax.Array, self_idx_R: jax.Array, all_ND: jax.Array,
                      n: int) -> jax.Array:
  """Median distance of each row to the first n images of `all_ND` other than itself."""
  sq = (jnp.sum(rows_RD**2, -1)[:, None] + jnp.sum(all_ND**2, -1)[None, :]
        - 2.0 * rows_RD @ all_ND.T)
  d = jnp.sqrt(jnp.maximum(sq, 0.0))
  col = jnp.arange(all_ND.shape[0])[None, :]
  # The row's own zero goes to the front, padding to the back; the median is taken over
  # the n - 1 distances to the others, sorted at positions 1 .. n - 1.
  d = jnp.where(col == self_idx_R[:, None], -1.0, jnp.where(col < n, d, jnp.inf))
  s = jnp.sort(d, axis=-1)
  lo, hi = 1 + (n - 2) // 2, 1 + (n - 1) // 2
  return 0.5 * (s[:, lo] + s[:, hi])


def medoid_index(images: np.ndarray, chunk: int = 512) -> int:
  """Index of the image with the smallest median distance to the others ([N, ...], N >= 1).

  Ties go to the lowest index. Images are compared as float32 vectors.
  """
  x = np.asarray(images, np.float32).reshape(len(images), -1)
  n = len(x)
  if n == 0:
    raise ValueError("medoid of an empty set of images")
  if n <= 2:
    return 0  # every image has the same median distance
  padded = -(-n // chunk) * chunk if n > chunk else n
  all_x = jnp.asarray(np.pad(x, ((0, padded - n), (0, 0))))
  rows = min(chunk, padded)
  med = np.concatenate([
      np.asarray(_median_distances(all_x[s:s + rows], jnp.arange(s, s + rows), all_x, n))
      for s in range(0, padded, rows)])[:n]
  return int(np.argmin(med))


def prototype_embedding(images: np.ndarray, labels: np.ndarray, num_classes: int) -> jax.Array:
  """W_embed [m, H*W*C]: row c is class c's medoid image, scaled to [0, 1] like the inputs."""
  images, labels = np.asarray(images), np.asarray(labels)
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  rows = []
  for c in range(num_classes):
    members = images[labels == c]
    if len(members) == 0:
      raise ValueError(f"class {c} has no training images: no prototype to initialise it with")
    rows.append(members[medoid_index(members)].reshape(-1).astype(np.float32) / scale)
  return jnp.asarray(np.stack(rows))
