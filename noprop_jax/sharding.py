"""Device meshes: stacked blocks split on a 'blocks' axis, batches on 'data'.

  mesh = make_mesh("blocks=4,data=2")
  state = jax.device_put(state, state_shardings(dt.METHOD.stacked, mesh, state))
  with jax.set_mesh(mesh):                      # trace the step with the mesh in context
    state, metrics = step(state, x, y)

Every leaf with the stacked T axis (block parameters, BatchNorm statistics, the blocks'
optimizer state) is split along 'blocks'; the head, embedding, their optimizer state and
the step count are replicated; a batch is split along 'data'.

Two places split the work by hand, where XLA's partitioner would not:
- `core.map_blocks` runs each device's own blocks on it (`over_blocks`: a `shard_map`
  over 'blocks'). Blocks never read each other, so this is exact, for any block. Left
  to the partitioner, a vmapped convolution becomes one grouped convolution, which it
  does not split: every device would compute every block after all-gathering them.
- the provided blocks' convolutions run each device's rows on it (`per_example`: a
  `shard_map` over 'data'). A convolution treats each example on its own, so this is
  exact too. Everything else on 'data' (dense layers, BatchNorm's batch statistics,
  dropout masks, the gradient sums) is left to XLA's partitioner, so a step on a mesh
  equals the single-device step up to float reordering.
Both read the mesh from JAX's context (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`),
set by the trainer around its steps. A block of your own with `flax.linen.Conv` layers
splits over 'blocks' as well; on 'data' write its convolutions with `per_example` (or
use `blocks.Conv`), or XLA gathers the whole batch for them.

Methods without stacked blocks (CT, FM, the baselines) use the 'data' axis only.
"""

from typing import Any, Callable

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P, Sharding

AXES = ("blocks", "data")


def parse_mesh(spec: str) -> dict[str, int]:
  """'blocks=4,data=2' -> {'blocks': 4, 'data': 2} (a missing axis has size 1; '' is one device)."""
  sizes = {"blocks": 1, "data": 1}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in sizes:
      raise ValueError(f"bad mesh {spec!r}: write it as 'blocks=B,data=D' (axes {list(sizes)})")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"bad mesh {spec!r}: {name} must be a whole number, got {value!r}") from None
    if sizes[name] < 1:
      raise ValueError(f"bad mesh {spec!r}: {name} must be >= 1, got {sizes[name]}")
  return sizes


def make_mesh(spec: str, devices=None) -> Mesh | None:
  """The ('blocks', 'data') mesh of a spec like 'blocks=4,data=2', or None for ''.

  `jax.make_mesh` orders the devices (on TPU, by the chips' physical topology, so that
  'data' neighbours are linked). Axes are Auto: XLA places what the code does not."""
  if not spec:
    return None
  shape = parse_mesh(spec)
  n = shape["blocks"] * shape["data"]
  devices = list(jax.devices() if devices is None else devices)
  if n > len(devices):
    raise ValueError(f"--mesh {spec} needs {n} devices, but {len(devices)} are visible "
                     f"({jax.default_backend()}); on CPU, simulate more with XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n} set before JAX starts")
  return jax.make_mesh((shape["blocks"], shape["data"]), AXES, (AxisType.Auto,) * 2,
                       devices=devices[:n])


def state_shardings(stacked: tuple[str, ...], mesh: Mesh, state: Any) -> Any:
  """A NamedSharding per leaf of `state` (arrays, shapes or tracers): the entries named in
  `stacked` (the method record's `stacked`) split along 'blocks', the rest replicated."""
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


# ----------------------------------------------------------------------------- splitting by hand

def context_axis(name: str) -> AbstractMesh | None:
  """The context's mesh where its axis `name` spans several devices and is not already
  split by hand (inside a `shard_map` over it), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or name not in mesh.axis_names or mesh.shape[name] == 1:
    return None
  if name in mesh.explicit_axes:
    raise ValueError(f"the mesh's {name!r} axis is Explicit (jax.make_mesh's default); these "
                     "steps place arrays on Auto axes: build the mesh with noprop_jax.sharding."
                     "make_mesh('blocks=B,data=D'), or jax.make_mesh(..., axis_types=(jax."
                     "sharding.AxisType.Auto,) * 2)")
  return None if name in mesh.manual_axes else mesh


def over_blocks(fn: Callable, xs: Any) -> Any:
  """`fn(xs)` with the leading (blocks) axis of every leaf of `xs` and of the result split
  over the context mesh's 'blocks' axis: each device runs `fn` on its own blocks, and
  `fn` may close over anything else (it is the same on every device). Without such an
  axis, `fn(xs)`."""
  mesh = context_axis("blocks")
  if mesh is None:
    return fn(xs)
  n, T = mesh.shape["blocks"], jax.tree.leaves(xs)[0].shape[0]
  if T % n:
    raise ValueError(f"the mesh's blocks={n} must divide the number of blocks T={T}")
  # check_vma off here and in per_example: JAX's typing of what varies over which axis
  # rejects custom gradient rules (the convolutions') whose cotangents vary over more
  # axes than their inputs; the specs here say exactly what is split.
  return jax.shard_map(fn, mesh=mesh, in_specs=P("blocks"), out_specs=P("blocks"),
                       axis_names={"blocks"}, check_vma=False)(xs)


def per_example(fn: Callable) -> Callable:
  """`fn(x, *params)`, for an `fn` that treats each row of x on its own (a convolution),
  with x's rows and the result's split over the context mesh's 'data' axis: each device
  computes its own rows, the parameters whole on every device, and in the gradient each
  device its rows' share, summed over 'data' for the parameters. Without such an axis,
  or with rows that do not split evenly, `fn` itself.

  The gradient is a `shard_map` of its own rather than JAX's transpose of the forward
  one: inside `over_blocks` (a `shard_map` over 'blocks') JAX cannot differentiate a
  nested `shard_map`."""

  def mapped(f, in_specs, out_specs):
    return jax.shard_map(f, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                         out_specs=out_specs, axis_names={"data"}, check_vma=False)

  @jax.custom_vjp
  def split(x, *params):
    return mapped(fn, (P("data"),) + (P(),) * len(params), P("data"))(x, *params)

  def split_fwd(x, *params):
    return split(x, *params), (x, params)

  def split_bwd(res, g):
    def local(x, params, g):
      g_x, *g_params = jax.vjp(fn, x, *params)[1](g)
      return g_x, jax.lax.psum(tuple(g_params), "data")

    g_x, g_params = mapped(local, (P("data"), P(), P("data")), (P("data"), P()))(*res, g)
    return (g_x, *g_params)

  split.defvjp(split_fwd, split_bwd)

  def call(x, *params):
    mesh = context_axis("data")
    if mesh is None or x.shape[0] % mesh.shape["data"]:
      return fn(x, *params)
    return split(x, *params)

  return call
