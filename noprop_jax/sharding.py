"""Device meshes: NoProp-DT's stacked blocks split on a 'blocks' axis, batches on 'data'.

  mesh = make_mesh(cfg)                      # cfg.mesh = "blocks=4,data=2"
  state = jax.device_put(state, state_shardings(cfg, mesh, state))

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from noprop_jax.config import MESH_AXES, Config

STACKED = ("blocks", "opt_blocks")  # DT state entries whose leaves lead with the T axis


def make_mesh(cfg: Config, devices=None) -> Mesh | None:
  """The ('blocks', 'data') mesh of cfg.mesh over the first devices, or None for ''."""
  if not cfg.mesh:
    return None
  shape = cfg.mesh_shape
  n = shape["blocks"] * shape["data"]
  devices = list(jax.devices() if devices is None else devices)
  if n > len(devices):
    raise ValueError(f"--mesh {cfg.mesh} needs {n} devices, but {len(devices)} are visible "
                     f"({jax.default_backend()}); on CPU, simulate more with XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n} set before JAX starts")
  return Mesh(np.array(devices[:n]).reshape(shape["blocks"], shape["data"]), MESH_AXES)


def state_shardings(cfg: Config, mesh: Mesh, state: Any) -> Any:
  """A NamedSharding per leaf of `state` (arrays, shapes or tracers)."""
  repl = NamedSharding(mesh, P())
  if cfg.method != "dt":
    return jax.tree.map(lambda _: repl, state)
  split = NamedSharding(mesh, P("blocks"))
  return {k: jax.tree.map(lambda _, s=(split if k in STACKED else repl): s, v)
          for k, v in state.items()}


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(tree: Any, shardings: Any) -> Any:
  return jax.lax.with_sharding_constraint(tree, shardings)
