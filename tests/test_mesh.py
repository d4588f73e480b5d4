"""Steps on simulated CPU devices: sharded blocks and batches match the single-device step
(8 devices), and each device computes only its share (4 devices).

The devices must be requested before JAX starts, so the work runs in fresh processes
(tests/mesh_check.py, tests/mesh_split_check.py) and these tests check what they print.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path


def _run(script: str) -> dict:
  """The JSON object that tests/`script` prints last, run in a fresh process."""
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script))],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_steps_on_eight_simulated_devices_match_one_device():
  result = _run("mesh_check.py")
  assert result["devices"] == 8
  # A step of T = 4 blocks, batch 64, from a state of the single-device run: equal to one
  # device's step up to float reordering.
  for case, blocks in (("dt blocks=4,data=2 k=0", 4), ("dt blocks=2,data=4 k=2", 2)):  # k=2: chunks
    r = result[case]
    assert r["mismatch"] is None, (case, r)  # equal up to float reordering (mesh_check.mismatch)
    assert r["loss_diff"] < 1e-4, (case, r)
    assert r["devices"] == 8
    # Each device holds T / blocks of the stacked blocks, and their optimizer state with them.
    assert r["blocks_per_device"] == [4 // blocks] * 8, case
    assert r["opt_blocks_per_device"] == [4 // blocks] * 8, case
    assert r["head_replicated"], case
  r = result["diffusion_blocks blocks=4,data=2"]  # the same machinery for DiffusionBlocks
  assert r["mismatch"] is None and r["blocks_per_device"] == [1] * 8, r
  assert result["ct data=8"]["mismatch"] is None, result["ct data=8"]  # CT splits its batch over 'data'
  r = result["train blocks=2,data=4"]  # the training loop itself on a mesh
  assert r["mesh"] == {"blocks": 2, "data": 4}
  assert 0.5 < r["test_accuracy"] <= 1.0  # well above chance (0.1)


def test_meshes_split_the_blocks_and_the_batch_with_the_gpu_defaults():
  """The trainer's NoProp-DT and DiffusionBlocks steps with the defaults a GPU user gets
  (vmap over the blocks, the stock convolution), compiled for 4 simulated devices: each
  device computes its own blocks ('blocks') and its own rows ('data'), with no all-gather
  of activations or kernels, and a quarter of the single device's FLOPs. A user's own
  jitted step traced under `jax.set_mesh` is split the same way; a mesh of Explicit axes
  gets an error that says how to build one."""
  result = _run("mesh_split_check.py")
  assert result["devices"] == 4
  T = 4
  for method in ("dt", "diffusion_blocks"):
    one = result[f"{method} one device"]
    assert one["all_gathers"] == []
    for mesh, blocks in (("blocks=4", 4), ("data=4", 1), ("blocks=2,data=2", 2)):
      r, case = result[f"{method} {mesh}"], (method, mesh)
      assert (r["formulation"], r["conv_impl"]) == ("vmap", "xla"), case  # the GPU defaults
      # Only the T per-block metrics are gathered (every host reads them): no activations,
      # no kernels.
      assert all(math.prod(s) <= T for s in r["all_gathers"]), (case, r["all_gathers"])
      # Activations: a quarter each (blocks split the channels of the T stacked blocks,
      # data the rows). Kernel gradients: split by the blocks axis only (on 'data' each
      # device sums its rows' share of every kernel's gradient).
      assert r["activation_conv_elements"] * 4 == one["activation_conv_elements"], case
      assert r["kernel_conv_elements"] * blocks == one["kernel_conv_elements"], case
      # Dense layers: each device's products are its blocks' (the shared head's, tiny, on
      # every device); on 'data' each device computes whole weight gradients of its rows.
      assert r["dot_elements"] <= 1.05 * one["dot_elements"] / blocks, case
      assert r["flops"] <= 1.1 * one["flops"] / 4, (case, r["flops"] / one["flops"])
  # A user's own step, traced under jax.set_mesh: split the same way, the same loss.
  r = result["functional"]
  assert abs(r["loss"] - r["loss_one_device"]) <= 1e-5 * abs(r["loss_one_device"]), r
  assert all(math.prod(s) <= T for s in r["all_gathers"]), r["all_gathers"]
  assert "Explicit" in r["explicit_error"] and "sharding.make_mesh" in r["explicit_error"]
