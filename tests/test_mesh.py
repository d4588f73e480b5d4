"""Blocks sharded over 8 simulated CPU devices match the single-device step.

The devices must be requested before JAX starts, so the work runs in a fresh
process (tests/mesh_check.py) and this test checks what it prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("mesh_check.py")


@pytest.fixture(scope="module")
def result():
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  proc = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, env=env,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_simulated_devices(result):
  assert result["devices"] == 8


@pytest.mark.parametrize("case, blocks", [("dt blocks=4,data=2 k=0", 4),
                                          ("dt blocks=2,data=4 k=2", 2)])  # k=2: chunks
def test_sharded_dt_step_matches_one_device(result, case, blocks):
  """Three steps of T = 4 blocks, batch 64: equal to one device up to float reordering."""
  r = result[case]
  assert r["diff"] <= 1.0, r  # mesh_check.max_diff: within the float-reordering tolerance
  assert r["loss_diff"] < 1e-4, r
  assert r["devices"] == 8
  # Each device holds T / blocks of the stacked blocks, and their optimizer state with them.
  assert r["blocks_per_device"] == [4 // blocks] * 8
  assert r["opt_blocks_per_device"] == [4 // blocks] * 8
  assert r["head_replicated"]


def test_ct_splits_the_batch_over_data(result):
  assert result["ct data=8"]["diff"] <= 1.0


def test_training_loop_runs_on_a_mesh(result):
  r = result["train blocks=2,data=4"]
  assert r["mesh"] == {"blocks": 2, "data": 4}
  assert 0.1 < r["test_accuracy"] <= 1.0
