"""Multi-host training for real: two processes on localhost, joined by jax.distributed (a local
coordinator, gloo collectives between CPU processes), 2 simulated devices each, train on a mesh
spanning all 4 devices, and match one process that simulates the 4 devices.

The work runs in fresh processes (tests/multihost_check.py): device counts and the distributed
runtime must be set before JAX starts. The hosts and the reference run side by side. The
states agree bitwise today; the tolerance leaves room for a collective's summation order.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import assert_trees

CHECK = Path(__file__).with_name("multihost_check.py")
TIMEOUT = 300  # seconds for all three processes (about 35 s of CPU time in all)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, log: Path, **kw) -> subprocess.Popen:
  # gRPC would send even 127.0.0.1 through a configured proxy.
  env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
  with log.open("w") as out:
    return subprocess.Popen([sys.executable, str(CHECK), *map(str, args)], env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True, **kw)


def _wait(procs: dict[str, subprocess.Popen], logs: dict[str, Path], names, deadline: float):
  """Wait for the processes `names` to succeed. On any process's failure (or the deadline),
  kill the rest (a host whose peer died would wait minutes for it) and fail with the logs."""
  while any(procs[n].poll() is None for n in names):
    failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
    if failed or time.monotonic() > deadline:
      for p in procs.values():
        if p.poll() is None:
          p.kill()
          p.wait()
      tails = "\n".join(f"--- {n} (exit {p.returncode}):\n{logs[n].read_text()[-3000:]}"
                        for n, p in procs.items())
      raise AssertionError(f"{failed or 'timed out'}:\n{tails}")
    time.sleep(0.2)
  for n in names:
    assert procs[n].returncode == 0, f"{n}:\n{logs[n].read_text()[-3000:]}"


def _load(path: Path) -> dict:
  z = np.load(path)
  out = {k: json.loads(str(z[k])) for k in ("summary", "lines", "writes")}
  out["devices"] = int(z["devices"])
  out["trees"] = {k: z[k] for k in z.files if k.startswith(("state", "restored"))}
  return out


def _tree(result: dict, name: str) -> dict:
  """The leaves of one saved tree ('state' or 'restored'), by their path."""
  return {k[len(name):]: v for k, v in result["trees"].items() if k.startswith(name + "[")}


@pytest.mark.skipif(not {"jax_cpu_collectives_implementation", "jax_num_cpu_devices"}
                    <= set(jax.config.values),
                    reason="this jax has no collectives between CPU processes")
def test_two_hosts_train_like_one_process_and_only_process_0_writes_run_files(tmp_path, digits):
  # A slice of the digits: 4 steps of 64, a test split of 120.
  np.savez(tmp_path / "data.npz", train_x=digits.train.images[:256],
           train_y=digits.train.labels[:256], test_x=digits.test.images[:120],
           test_y=digits.test.labels[:120])
  hosts, ref = tmp_path / "hosts", tmp_path / "ref"
  port, dataset = _free_port(), tmp_path / "data.npz"
  logs = {n: tmp_path / f"{n}.log" for n in ("host0", "host1", "ref")}
  deadline = time.monotonic() + TIMEOUT
  procs = {f"host{i}": _start([dataset, hosts, tmp_path / f"host{i}.npz", port, i, 2],
                              logs[f"host{i}"]) for i in (0, 1)}
  procs["ref"] = _start([dataset, ref, tmp_path / "ref.npz", hosts], logs["ref"],
                        stdin=subprocess.PIPE)
  try:
    _wait(procs, logs, ("host0", "host1"), deadline)
    procs["ref"].stdin.write("hosts done\n")  # now it may restore the hosts' checkpoint
    procs["ref"].stdin.close()
    _wait(procs, logs, ("ref",), deadline)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
  h0, h1, r = (_load(tmp_path / f"{n}.npz") for n in ("host0", "host1", "ref"))
  assert h0["devices"] == h1["devices"] == r["devices"] == 4

  # Both hosts end with the reference's state (interrupted after step 3 and resumed from
  # the checkpoint at step 2: still the same steps), gathered whole from the mesh.
  ref_state = _tree(r, "state")
  assert len(ref_state) > 10 and _tree(h0, "state").keys() == ref_state.keys()
  for h in (h0, h1):
    assert_trees(_tree(h, "state"), ref_state, rtol=1e-6, atol=1e-7)
  assert h0["summary"]["test_accuracy"] == r["summary"]["test_accuracy"]
  assert h0["summary"]["test_accuracy_stochastic_runs"] == r["summary"]["test_accuracy_stochastic_runs"]
  assert h0["summary"]["mesh"] == {"blocks": 2, "data": 2}

  # The checkpoint both hosts wrote together is complete: one process restores it.
  assert int(r["trees"]["restored_step"]) == 4
  restored = _tree(r, "restored")
  assert restored.keys() == ref_state.keys()
  assert_trees(restored, ref_state, rtol=1e-6, atol=1e-7)
  assert sorted(int(p.name) for p in (hosts / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]

  # Run files: process 0 wrote them all, process 1 none (nor printed).
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert name in h0["writes"], h0["writes"]
    assert (hosts / name).exists()
  assert h1["writes"] == [] and h1["lines"] == []
  assert any(l.startswith("resuming from checkpoint at step 2") for l in h0["lines"])
  [mh], [one] = ([json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
                 for d in (hosts, ref))
  timing = ("seconds", "eval_seconds")
  assert {k: v for k, v in mh.items() if k not in timing} == \
         {k: v for k, v in one.items() if k not in timing}
  assert json.loads((hosts / "summary.json").read_text())["test_accuracy"] == h0["summary"]["test_accuracy"]
