"""Run by tests/test_mesh.py in a fresh process: the trainer's compiled steps on 4 simulated
CPU devices (requested before JAX starts), with the defaults a GPU user gets. Prints one
JSON object: per method and mesh, what the compiled program holds per device."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import chex  # noqa: E402

chex.set_n_cpu_devices(4)  # before JAX starts its backends

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402

from conftest import build  # noqa: E402  (this script's folder: tests/)
from noprop_jax import data, sharding, trainer  # noqa: E402
from noprop_jax import method as methods  # noqa: E402
from noprop_jax.config import RunConfig  # noqa: E402

# A script of its own process, not a test module: no pytest fixtures here.
DIGITS = data.load("digits")
N = len(DIGITS.train.labels)
T, B = 4, 64
MESHES = ("", "blocks=4", "data=4", "blocks=2,data=2")
SHAPE = re.compile(r"= (\w+)\[([\d,]*)\]")


def compiled(method: str, mesh_spec: str):
  """The trainer's epoch step for `method` on `mesh_spec`, resolved for a GPU, compiled here
  for abstract inputs placed as the trainer places them."""
  cfg = RunConfig.create(method, dataset="digits", T=T, batch_size=B, mesh=mesh_spec)
  compute, model = build(cfg, backend="gpu")
  state = jax.eval_shape(lambda: trainer.init_state(cfg, model, jax.random.key(0)))
  mesh = sharding.make_mesh(mesh_spec)
  at = lambda a, s=None: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  if mesh is None:
    state_sh, repl = jax.tree.map(lambda _: None, state), None
  else:
    state_sh, repl = sharding.state_shardings(methods.get(method).stacked, mesh, state), sharding.replicated(mesh)
  args = (jax.tree.map(at, state, state_sh), at(DIGITS.train.images, repl),
          at(DIGITS.train.labels, repl), jax.ShapeDtypeStruct((N,), "int32", sharding=repl))
  step = trainer.make_epoch_step(cfg, model, compute, N)
  return step.lower(*args).compile(), compute, model


def shapes(hlo: str, op: str) -> list[list[int]]:
  """The output shape of every `op` instruction of the compiled (per-device) program."""
  out = []
  for line in hlo.splitlines():
    if f" {op}(" in line:
      dims = SHAPE.search(line).group(2)
      out.append([int(d) for d in dims.split(",")] if dims else [])
  return out


def main():
  out = {"devices": len(jax.devices())}
  for method in ("dt", "diffusion_blocks"):
    for spec in MESHES:
      c, compute, model = compiled(method, spec)
      hlo = c.as_text()
      convs = shapes(hlo, "convolution")
      # A 3x3 kernel's gradient is [C_in, 3, 3, T * C_out]; every other convolution here
      # (the digits' images are 8x8, 4x4, 2x2) is an activation [batch, H, W, T * C].
      kernels = [s for s in convs if s[1:3] == [3, 3]]
      out[f"{method} {spec or 'one device'}"] = {
          "formulation": compute.formulation, "conv_impl": model.block.conv_impl,
          "flops": c.cost_analysis()["flops"],
          "all_gathers": shapes(hlo, "all-gather") + shapes(hlo, "all-gather-start"),
          "convolutions": sorted(convs),
          "activation_conv_elements": sum(math.prod(s) for s in convs if s not in kernels),
          "kernel_conv_elements": sum(math.prod(s) for s in kernels),
          "dots": sorted(shapes(hlo, "dot")),
          "dot_elements": sum(math.prod(s) for s in shapes(hlo, "dot")),
          "conditionals": hlo.count(" conditional(")}
  out["functional"] = functional_api()
  print(json.dumps(out))


def functional_api() -> dict:
  """A user's own jitted NoProp-DT step (the paper's block, the stock convolution) run under
  `jax.set_mesh` on blocks=2,data=2, against the same step on one device; and the error a
  mesh of Explicit axes (jax.make_mesh's default) gets."""
  import jax.numpy as jnp

  from noprop_jax import blocks, dt

  x, y = DIGITS.train.images[:B], DIGITS.train.labels[:B]
  model = dt.Model(blocks.DTBlock(10, "SAME", conv_impl="xla"), (8, 8, 1), 10, T=T)
  step = dt.make_train_step(model, compute=dt.Compute("vmap"))
  state = dt.init(model, jax.random.key(0))
  _, want = step(jax.tree.map(jnp.copy, state), x, y)
  mesh = sharding.make_mesh("blocks=2,data=2")
  copy = lambda: jax.tree.map(jnp.copy, state)  # the step donates its state
  on_mesh = jax.device_put(copy(), sharding.state_shardings(dt.STACKED, mesh, state))
  with jax.set_mesh(mesh):
    xy = jax.device_put((x, y), sharding.batch_sharding(mesh))
    hlo = step.jitted.lower(on_mesh, *xy).compile().as_text()
    _, got = step(on_mesh, *xy)
  explicit = jax.make_mesh((2, 2), sharding.AXES)
  try:
    with jax.set_mesh(explicit):
      step(jax.device_put(copy(), sharding.state_shardings(dt.STACKED, explicit, state)), x, y)
    error = None
  except ValueError as e:
    error = str(e)
  return {"loss": float(got["loss"]), "loss_one_device": float(want["loss"]),
          "all_gathers": shapes(hlo, "all-gather") + shapes(hlo, "all-gather-start"),
          "explicit_error": error}


if __name__ == "__main__":
  main()
