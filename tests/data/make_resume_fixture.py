"""Writes tests/data/resume_v0_3/: runs of the digits data interrupted mid-epoch by the
code at commit 12e877d (noprop_jax 0.3.0), with the final state the uninterrupted run
reached, to check that later code resumes checkpoints written by that version exactly.

Run once, with that version: python tests/data/make_resume_fixture.py
"""

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from noprop_jax import data, trainer
from noprop_jax.config import RunConfig

OUT = Path(__file__).parent / "resume_v0_3"
SETTINGS = {"dt": dict(T=2), "ct": dict(), "local": dict(T=2)}
COMMON = dict(dataset="digits", block="mlp", hidden=16, depth=1, batch_size=128, epochs=2,
              inference_runs=1, eval_every=1)


def leaves(state) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(p): np.asarray(jax.random.key_data(v) if jax.dtypes.issubdtype(
      getattr(v, "dtype", None), jax.dtypes.prng_key) else v) for p, v in flat}


if __name__ == "__main__":
  shutil.rmtree(OUT, ignore_errors=True)
  ds = data.load("digits")
  quiet = dict(dataset=ds, progress=False, print_fn=lambda s: None, checkpoint_every=4)
  for method, own in SETTINGS.items():
    cfg = RunConfig.create(method, **COMMON, **own)
    full = OUT / f"{method}_full"
    summary = trainer.train(cfg, full, **quiet)
    _, _, state, step = trainer.load_run(full)
    np.savez(OUT / f"{method}_final.npz", **leaves(state))
    (OUT / f"{method}_summary.json").write_text(json.dumps(
        {k: summary[k] for k in ("test_accuracy_mean_path", "steps")}))
    shutil.rmtree(full)
    assert trainer.train(cfg, OUT / method, stop_at_step=14, **quiet) is None  # mid epoch 2
  print(sorted(p.name for p in OUT.iterdir()), file=sys.stderr)
