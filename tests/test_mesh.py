"""Blocks sharded over 8 simulated CPU devices match the single-device step.

The devices must be requested before JAX starts, so the work runs in a fresh
process (tests/mesh_check.py) and this test checks what it prints. One test,
so that a parallel test run never starts the (slow) process twice.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).with_name("mesh_check.py")


def test_sharded_steps_on_eight_simulated_devices_match_one_device():
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  proc = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, env=env,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8
  # A step of T = 4 blocks, batch 64, from a state of the single-device run: equal to one
  # device's step up to float reordering.
  for case, blocks in (("dt blocks=4,data=2 k=0", 4), ("dt blocks=2,data=4 k=2", 2)):  # k=2: chunks
    r = result[case]
    assert r["diff"] <= 1.0, (case, r)  # mesh_check.max_diff: within the reordering tolerance
    assert r["loss_diff"] < 1e-4, (case, r)
    assert r["devices"] == 8
    # Each device holds T / blocks of the stacked blocks, and their optimizer state with them.
    assert r["blocks_per_device"] == [4 // blocks] * 8, case
    assert r["opt_blocks_per_device"] == [4 // blocks] * 8, case
    assert r["head_replicated"], case
  r = result["diffusion_blocks blocks=4,data=2"]  # the same machinery for DiffusionBlocks
  assert r["diff"] <= 1.0 and r["blocks_per_device"] == [1] * 8, r
  assert result["ct data=8"]["diff"] <= 1.0  # CT splits its batch over 'data'
  r = result["train blocks=2,data=4"]  # the training loop itself on a mesh
  assert r["mesh"] == {"blocks": 2, "data": 4}
  assert 0.5 < r["test_accuracy"] <= 1.0  # well above chance (0.1)
