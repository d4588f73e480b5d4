"""Run by tests/test_mesh.py in a fresh process: 8 simulated CPU devices must be requested
before JAX starts. Prints one JSON object with what the test asserts."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import chex  # noqa: E402

chex.set_n_cpu_devices(8)  # before JAX starts its backends

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import assert_trees, build, reordering_atol  # noqa: E402  (this script's folder: tests/)
from noprop_jax import data, sharding, trainer  # noqa: E402
from noprop_jax.config import RunConfig  # noqa: E402

# A script of its own process, not a test module: no pytest fixtures here.
DIGITS = data.load("digits")
N = len(DIGITS.train.labels)


def stepper(cfg: RunConfig):
  """state -> (state, metrics): one step of the trainer's jitted epoch step on cfg's mesh,
  from a copy of the state placed there (the step donates its input). The trainer builds
  one step per setting, so the DT reference compiles once for both comparisons."""
  mesh = sharding.make_mesh(cfg.train.mesh)
  compute, model = build(cfg)
  on = None
  if mesh is not None:
    on = sharding.replicated(mesh)
  x, y = jax.device_put(DIGITS.train.images, on), jax.device_put(DIGITS.train.labels, on)
  step = trainer.make_epoch_step(cfg, model, compute, N)

  def one(state):
    state = jax.tree.map(jnp.copy, state)
    if mesh is not None:
      state = jax.device_put(state, sharding.state_shardings(cfg.method_record.stacked, mesh, state))
    order = trainer.batch_order(state["rng"], state["step"], N, N // cfg.train.batch_size)
    return step(state, x, y, order)
  return one


def compare(ref_cfg: RunConfig, cfg: RunConfig):
  """A reference step from the initial state, then cfg's step and the reference's from
  the state it reached (nonzero step count, Adam moments and BatchNorm averages): cfg's
  new state, how it differs from the reference's beyond float reordering (`mismatch`) and
  the relative difference of their losses.

  From the same state, not a run each: NoProp-DT's last block (its Eq. 8 weight is ~1e4)
  grows float differences of ~1e-6 to a few % of its parameters within three steps, by an
  amount that depends on how the compiler orders the sums."""
  ref_step, step = stepper(ref_cfg), stepper(cfg)
  state, _ = ref_step(trainer.init_state(ref_cfg, build(ref_cfg)[1], jax.random.key(0)))
  got, m = step(state)
  want, m_ref = ref_step(state)
  loss_diff = abs(float(m["loss"]) - float(m_ref["loss"])) / abs(float(m_ref["loss"]))
  return got, mismatch(got, want), loss_diff


def mismatch(got, want) -> str | None:
  """None where `got` equals `want` up to float reordering, leaf by leaf (conftest's
  assert_trees with reordering_atol, as tests/test_parallel.py compares its states); else
  the error that says where and by how much they differ."""
  try:
    assert_trees(jax.device_get(got), jax.device_get(want), atol=reordering_atol)
  except AssertionError as e:
    return str(e)
  return None


def main():
  out = {"devices": len(jax.devices())}
  base = dict(dataset="digits", T=4, batch_size=64, formulation="vmap")
  for mesh, k in (("blocks=4,data=2", 0), ("blocks=2,data=4", 2)):
    state, diff, loss_diff = compare(RunConfig.create(**base),
                                     RunConfig.create(**base, mesh=mesh, blocks_per_step=k))
    leaf = state["blocks"]["params"]["image"]["Conv_0"]["kernel"]
    out[f"dt {mesh} k={k}"] = {
        "mismatch": diff,
        "loss_diff": loss_diff,
        "devices": len(leaf.sharding.device_set),
        "blocks_per_device": [int(sh.data.shape[0]) for sh in leaf.addressable_shards],
        "opt_blocks_per_device": [int(sh.data.shape[0]) for sh in
                                  jax.tree.leaves(state["opt_blocks"])[0].addressable_shards],
        "head_replicated": all(sh.data.shape == state["shared"]["head"]["kernel"].shape
                               for sh in state["shared"]["head"]["kernel"].addressable_shards)}
  # DiffusionBlocks shares NoProp-DT's stacked machinery: its blocks split on 'blocks' too.
  c = dict(method="diffusion_blocks", dataset="digits", T=4, batch_size=64, block="mlp", hidden=64,
           formulation="vmap")
  state, diff, _ = compare(RunConfig.create(**c), RunConfig.create(**c, mesh="blocks=4,data=2"))
  leaf = jax.tree.leaves(state["blocks"]["params"])[0]
  out["diffusion_blocks blocks=4,data=2"] = {
      "mismatch": diff,
      "blocks_per_device": [int(sh.data.shape[0]) for sh in leaf.addressable_shards]}
  for method in ("ct",):
    # Data parallelism does not depend on the block: a small MLP keeps the check fast.
    c = dict(method=method, dataset="digits", batch_size=64, block="mlp", hidden=64)
    _, diff, _ = compare(RunConfig.create(**c), RunConfig.create(**c, mesh="data=8"))
    out[f"{method} data=8"] = {"mismatch": diff}
  with tempfile.TemporaryDirectory() as d:
    # An MLP block: two epochs reach ~0.8 (the paper block's BatchNorm averages need more).
    cfg = RunConfig.create(dataset="digits", T=2, epochs=2, inference_runs=1, mesh="blocks=2,data=4",
                           block="mlp")
    s = trainer.train(cfg, d, dataset=DIGITS, progress=False, print_fn=lambda _: None)
    out["train blocks=2,data=4"] = {"test_accuracy": s["test_accuracy"], "mesh": s["mesh"]}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
