"""Device meshes: NoProp-DT's stacked blocks split on a 'blocks' axis, batches on 'data'.

  mesh = make_mesh("blocks=4,data=2")
  state = jax.device_put(state, state_shardings(dt.STACKED, mesh, state))

Every leaf with the stacked T axis (block parameters, BatchNorm statistics,
the blocks' optimizer state) is split along 'blocks'; the head, embedding,
their optimizer state and the step count are replicated; a batch is split
along 'data'. The step is the same jitted function on 1 or N devices: XLA's
SPMD partitioner runs each device's blocks on its share of the batch and
reduces BatchNorm statistics and the shared gradients across devices, so the
result equals the single-device step up to floating-point reordering. Methods
without stacked blocks (CT, FM, the baselines) use the 'data' axis only.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding

from noprop_jax.config import parse_mesh

AXES = ("blocks", "data")


def make_mesh(spec: str, devices=None) -> Mesh | None:
  """The ('blocks', 'data') mesh of a spec like 'blocks=4,data=2' over the first devices,
  or None for ''."""
  if not spec:
    return None
  shape = parse_mesh(spec)
  n = shape["blocks"] * shape["data"]
  devices = list(jax.devices() if devices is None else devices)
  if n > len(devices):
    raise ValueError(f"--mesh {spec} needs {n} devices, but {len(devices)} are visible "
                     f"({jax.default_backend()}); on CPU, simulate more with XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n} set before JAX starts")
  return Mesh(np.array(devices[:n]).reshape(shape["blocks"], shape["data"]), AXES)


def state_shardings(stacked: tuple[str, ...], mesh: Mesh, state: Any) -> Any:
  """A NamedSharding per leaf of `state` (arrays, shapes or tracers): the entries named in
  `stacked` (the method's STACKED) split along 'blocks', the rest replicated."""
  repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("blocks"))
  return {k: jax.tree.map(lambda _, s=(split if k in stacked else repl): s, v)
          for k, v in state.items()}


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def place(tree: Any, shardings: Any) -> Any:
  """`tree` (host values or arrays, the same on every process) placed as `shardings` (one
  Sharding for every leaf, a tree of them, or None: the default device) say.

  On one host this is jax.device_put. A mesh that spans other hosts' devices takes more:
  there device_put first compares each value across hosts (a gather of it: the whole
  dataset) and refuses arrays committed to a device, as restored checkpoints are. Here
  every process builds its own devices' shards from its copy instead."""
  if shardings is None:
    return jax.device_put(tree)
  if isinstance(shardings, Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def one(x, s: Sharding):
    if s.is_fully_addressable:
      return jax.device_put(x, s)
    x = jax.device_get(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  return jax.tree.map(one, tree, shardings)


def constrain(tree: Any, shardings: Any) -> Any:
  return jax.lax.with_sharding_constraint(tree, shardings)
