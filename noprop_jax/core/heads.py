"""The class embedding and the linear head, and the terms the losses share on them.

The embedding's size and initial value (one-hot, learned or prototype), its rows for
labels, the zero and readout heads, the baselines' chain link, and the head's logits,
squared distances to the embeddings and cross entropy.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from noprop_jax.core.checks import check_choice

EMBEDDINGS = ("onehot", "learned", "prototype")
LEARNED_DIM = 20  # a learned embedding's default size (the paper's CIFAR-100 rows)


def embedding_dim(kind: str, dim: int, num_classes: int, input_size: int) -> int:
  """d: one-hot has m, prototype the input size, learned `dim` (default 20)."""
  check_choice("embedding", kind, EMBEDDINGS)
  fixed = {"onehot": (num_classes, "the number of classes"),
           "prototype": (input_size, "the input size (product of input_shape)")}
  if kind in fixed:
    want, what = fixed[kind]
    if dim not in (0, want):
      raise ValueError(f"embedding_dim={dim} with a {kind} embedding: it must equal {what} "
                       f"({want}) or be 0; use embedding 'learned' for another size")
    return want
  if dim < 0:
    raise ValueError(f"embedding_dim must be >= 0 (0: {LEARNED_DIM}), got {dim}")
  return dim or LEARNED_DIM


def model_dim(model) -> int:
  """d of a method's Model with `embedding` and `embedding_dim` settings."""
  return embedding_dim(model.embedding, model.embedding_dim, model.num_classes,
                       math.prod(model.input_shape))


def init_embedding(kind: str, key: jax.Array, m: int, d: int,
                   embed: jax.Array | None = None) -> jax.Array | None:
  """W_embed's initial value: None for one-hot (the fixed identity); orthonormal rows (or
  columns, when d < m) for learned; `embed` (`prototypes.prototype_embedding`) for prototype."""
  if kind == "onehot":
    return None
  if kind == "learned":
    return nn.initializers.orthogonal()(key, (m, d), jnp.float32)
  if embed is None:
    raise ValueError("a prototype embedding is initialised from the training inputs: pass "
                     "embed=prototypes.prototype_embedding(inputs, labels, num_classes)")
  if tuple(embed.shape) != (m, d):
    raise ValueError(f"prototype embedding must have shape ({m}, {d}), got {tuple(embed.shape)}")
  return jnp.asarray(embed, jnp.float32)


def embedding_matrix(params: dict, m: int) -> jax.Array:
  """W_embed [m, d]: the learned matrix where there is one, else the one-hot identity."""
  return params["embed"] if "embed" in params else jnp.eye(m, dtype=jnp.float32)


def label_rows(W_MD: jax.Array, y: jax.Array) -> jax.Array:
  """W_MD[y], the embedding rows of labels y: [B, d], written as one_hot(y) @ W. The same
  values (each a product by 1, at the highest matmul precision), but its gradient in W
  is a matmul, which a mesh's 'data' axis splits, where the gather's (a scatter-add)
  makes XLA gather every device's rows first."""
  # Not jax.nn.one_hot, whose iota takes y's sharding, which JAX refuses inside shard_map.
  onehot = (y[:, None] == jnp.arange(W_MD.shape[0])[None, :]).astype(W_MD.dtype)
  return jnp.dot(onehot, W_MD, precision=lax.Precision.HIGHEST)


def zero_head(d: int, m: int) -> dict:
  """A linear head at zero: softmax regression on z is convex, and from zero Adam's first
  step already points it the right way; a random start needs thousands of steps to undo."""
  return {"kernel": jnp.zeros((d, m), jnp.float32), "bias": jnp.zeros((m,), jnp.float32)}


READOUT_SCALE = 10.0


def readout_head(W_MD: jax.Array) -> dict:
  """A linear head that starts as a nearest-embedding readout, logits_c = 10 <u_c, z> /
  mean ||u||^2, for the baselines, whose head is trained only through the network's own
  z (entries within the embeddings' range): from zero no gradient would reach the blocks,
  and from a random start AdamW needs thousands of steps to grow separating logits."""
  scale = READOUT_SCALE / jnp.mean(jnp.sum(W_MD**2, axis=-1))
  return {"kernel": scale * W_MD.T, "bias": jnp.zeros((W_MD.shape[0],), jnp.float32)}


def chain_link(z_BD: jax.Array, alpha, logits: jax.Array, W_MD: jax.Array) -> jax.Array:
  """One link of the baselines' chain: z_t = (1 - alpha_t) z_{t-1} + alpha_t softmax(logits) @ W."""
  return (1.0 - alpha) * z_BD + alpha * (jax.nn.softmax(logits) @ W_MD)


def head_logits(head: dict, z_BD: jax.Array) -> jax.Array:
  """The linear classifier W_out z + b_out: [B, m]."""
  return z_BD @ head["kernel"] + head["bias"][None, :]


def sq_dist(z_BD: jax.Array, W_MD: jax.Array) -> jax.Array:
  """||z_b - u_c||^2 for every row and class: [B, m]."""
  return jnp.sum((z_BD[:, None, :] - W_MD[None, :, :]) ** 2, axis=-1)


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
