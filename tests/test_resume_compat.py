"""Checkpoints written by noprop_jax 0.3.0 (tests/data/resume_v0_3, made by
tests/data/make_resume_fixture.py at that version) resume with this code, and the resumed
run ends where the uninterrupted 0.3.0 run ended."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from noprop_jax import workdir as wd
from noprop_jax.config import RunConfig
from noprop_jax.trainer import load_run, train

from conftest import reordering_atol

DATA = Path(__file__).parent / "data" / "resume_v0_3"


def _leaves(state) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


@pytest.mark.parametrize("method", ["dt", "ct", "local"])
def test_a_checkpoint_of_the_previous_version_resumes_exactly(tmp_path, digits, method):
  workdir = tmp_path / method
  shutil.copytree(DATA / method, workdir)
  saved = wd.read_config(workdir / "config.json")[0]
  cfg = RunConfig.from_dict(saved)
  assert cfg.to_dict() == saved  # the saved settings read back unchanged: no config mismatch
  log = []
  s = train(cfg, workdir, dataset=digits, progress=False, print_fn=log.append, checkpoint_every=4)
  assert any("resuming from checkpoint at step 12" in line for line in log), log
  _, _, state, step = load_run(workdir)
  want = dict(np.load(DATA / f"{method}_final.npz"))
  got = _leaves(state)
  assert step == 22 and set(got) == set(want)
  for k, ref in want.items():
    if ref.dtype.kind in "iu":  # step count, key data: exact
      np.testing.assert_array_equal(got[k], ref, err_msg=k)
    elif (atol := reordering_atol(ref)) is not None:
      np.testing.assert_allclose(got[k], ref, rtol=0, atol=atol, err_msg=k)
  ref_summary = json.loads((DATA / f"{method}_summary.json").read_text())
  assert s["steps"] == ref_summary["steps"]
  assert abs(s["test_accuracy_mean_path"] - ref_summary["test_accuracy_mean_path"]) <= 2 / 359
