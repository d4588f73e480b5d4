"""How T stacked blocks are mapped on this backend.

Blocks are stacked on a leading T axis; `map_blocks` maps over them as `Compute` says
(vmapped, unrolled, or in chunks inside a `lax.scan`, split over a mesh's 'blocks' axis),
`fold_blocks` runs them as a chain, and `take`/`put` read and write one block's slice.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from noprop_jax import sharding
from noprop_jax.core.protocol import init_block
from noprop_jax.core.settings import Compute

def take(tree: Any, i) -> Any:
  """Block i's slice of a tree stacked on a leading T axis (i may be traced)."""
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def put(tree: Any, i, new: Any) -> Any:
  return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v, i, 0), tree, new)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def vmaps_blocks(formulation: str, k: int) -> bool:
  """Whether `map_blocks` batches k blocks at a time under `jax.vmap`: only 'vmap' with k > 1
  does; 'unroll' writes k copies and a single block (the scan, k = 1) runs as itself. The
  paper block picks its CPU convolution by this."""
  return formulation == "vmap" and k > 1


def chain_compute(T: int, compute: Compute | None) -> Compute:
  """How inference runs T stacked blocks: as the training step maps them, all T at once
  (unrolled, as on XLA:CPU, or vmapped) or one at a time where it scans them; `fold_blocks`
  unrolls the chain where the step unrolls, else scans it."""
  form = (compute or Compute()).resolve(T).formulation
  return Compute(form, blocks_per_step=1) if form == "scan" else Compute(form)


def map_blocks(fn: Callable, xs: Any, compute: Compute) -> Any:
  """fn(x_t) over the leading T axis of the pytree `xs`, stacked, as `compute` says.

  k = blocks_per_step blocks run at once ('vmap': batched into one program, fast on
  GPU/TPU; 'unroll': k copies, fast on XLA:CPU) and the T / k chunks one after another
  in a `lax.scan` ('scan' is k = 1, fn called on the one block itself, with no vmap axis
  of size 1): fewer at once need less temporary memory. Under a
  context mesh with a 'blocks' axis of n devices, each device maps over its own T / n
  blocks, k / n at once (`sharding.over_blocks`). Same results for every k and mesh up
  to float reordering.
  """
  T = num_stacked(xs)
  k = compute.blocks_per_step or T

  def local(xs):
    n = T // num_stacked(xs)  # the devices the blocks are split over
    if k % n:
      raise ValueError(f"blocks_per_step {k} must be a multiple of the mesh's blocks={n}")
    return _map_chunks(fn, xs, k // n, compute.formulation)

  return sharding.over_blocks(local, xs)


def _map_chunks(fn: Callable, xs: Any, k: int, formulation: str) -> Any:
  """fn over the leading axis of `xs`, k at a time; chunk c holds blocks c, c + n, ..."""
  T = num_stacked(xs)
  if vmaps_blocks(formulation, k):
    inner = jax.vmap(fn)
  else:
    inner = lambda c: _stack([fn(jax.tree.map(lambda a: a[i], c)) for i in range(k)])
  if k == T:
    return inner(xs)
  n = T // k  # [T, ...] -> [n, k, ...]: chunk c = blocks c, c + n, ...
  chunks = jax.tree.map(lambda a: a.reshape(k, n, *a.shape[1:]).swapaxes(0, 1), xs)
  out = lax.scan(lambda _, c: (None, inner(c)), None, chunks)[1]
  return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(T, *a.shape[2:]), out)


def fold_blocks(step: Callable, z0: Any, xs: Any, compute: Compute) -> tuple[Any, Any]:
  """`step(z, x_t) -> (z, out_t)` folded over the stacked blocks in order (a chain):
  unrolled for 'unroll' (conv gradients inside loops are slow on XLA:CPU), else `lax.scan`."""
  if compute.formulation != "unroll":
    return lax.scan(step, z0, xs)
  outs, z = [], z0
  for i in range(jax.tree.leaves(xs)[0].shape[0]):
    z, out = step(z, jax.tree.map(lambda a: a[i], xs))
    outs.append(out)
  return z, _stack(outs)


def init_stacked(block: nn.Module, key: jax.Array, T: int, *inputs) -> dict:
  """T independently initialised copies of the block's variables, stacked on a leading axis."""
  return jax.vmap(lambda k: init_block(block, k, *inputs))(jax.random.split(key, T))


def num_stacked(tree: Any) -> int:
  return jax.tree.leaves(tree)[0].shape[0]
