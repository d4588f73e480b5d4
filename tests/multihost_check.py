"""Run by tests/test_multihost.py: one host of a multi-host run, or its single-process reference.

  python tests/multihost_check.py DATA.npz WORKDIR OUT.npz PORT PROCESS_ID NUM_PROCESSES
  python tests/multihost_check.py DATA.npz WORKDIR OUT.npz [RESTORE_WORKDIR]   # the reference

A host joins the others through jax.distributed (a coordinator on 127.0.0.1:PORT, gloo
collectives between CPU processes) with DEVICES simulated devices of its own; the reference
simulates all of them in one process. Both train the same tiny NoProp-DT run with
`trainer.train` on a mesh spanning every device: 4 steps with checkpoints at steps 2 and
4, an evaluation, the summary. The hosts are "killed" after step 3 and resume from step 2;
the reference runs through. OUT.npz gets the state train() ends with (gathered whole to
the host), the summary, the lines `print_fn` got, and the files under WORKDIR (outside
checkpoints/, which orbax writes from every host) that this process wrote. Then the
reference waits for a line on stdin (the hosts are done) and adds the state
`trainer.load_run(RESTORE_WORKDIR)` restores.
"""

import os
import sys

DEVICES = 2  # simulated CPU devices per host
MESH = "blocks=2,data=2"  # spans the 4 devices of 2 hosts
os.environ["JAX_PLATFORMS"] = "cpu"
# LLVM's optimizations would take longer than the few steps they speed up (the same on both sides).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import json  # noqa: E402
import traceback  # noqa: E402

import chex  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

WRITES = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link",
          "os.symlink", "os.utime", "os.chmod", "shutil.rmtree", "shutil.move", "shutil.copyfile")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def record_writes(workdir: str) -> list[str]:
  """The run files this process writes from now on: every path under `workdir` (outside
  checkpoints/) that Python opens for writing, renames, removes or creates, however the
  trainer does it (an audit hook sees open, os.open, os.replace, pathlib, shutil...)."""
  root = os.path.realpath(workdir)
  skip = os.path.join(root, "checkpoints")
  seen: list[str] = []

  def inside(p) -> str | None:
    if isinstance(p, int):  # a file descriptor
      return None
    p = os.path.realpath(os.fsdecode(p))
    if p.startswith(root + os.sep) and not (p == skip or p.startswith(skip + os.sep)):
      return os.path.relpath(p, root)
    return None

  def hook(event, args):
    if event == "open":
      path, mode, flags = args
      if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & WRITE_FLAGS):
        return
      paths = [path]
    elif event in WRITES:
      paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    else:
      return
    seen.extend(p for p in map(inside, paths) if p is not None)

  sys.addaudithook(hook)
  return seen


def dataset(path: str):
  """The test's slice of digits, from DATA.npz (sklearn would take seconds to import)."""
  from noprop_jax import data

  a = np.load(path)
  return data.Dataset("digits", data.Split(a["train_x"], a["train_y"]),
                      data.Split(a["test_x"], a["test_y"]), 10, "digits slice")


def start_host(port: str, pid: int, n: int) -> None:
  """Join the other hosts: DEVICES CPU devices here, gloo for the collectives between processes."""
  chex.set_n_cpu_devices(DEVICES)  # before JAX starts its backends
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid,
                             coordinator_bind_address=f"127.0.0.1:{port}",  # not [::]: IPv6 may be off
                             local_device_ids=list(range(DEVICES)),
                             cluster_detection_method="deactivate", initialization_timeout=120)
  assert jax.process_count() == n and len(jax.local_devices()) == DEVICES


def main():
  data_path, workdir, out = sys.argv[1:4]
  hosts = len(sys.argv) > 5
  if hosts:
    start_host(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
  else:
    chex.set_n_cpu_devices(2 * DEVICES)  # all the hosts' devices, simulated here
  from jax.experimental import multihost_utils

  from noprop_jax import trainer
  from noprop_jax.config import RunConfig

  cfg = RunConfig.create("dt", dataset="digits", block="mlp", hidden=64, T=2, epochs=1,
                         batch_size=64, inference_runs=2, mesh=MESH)
  final, summarize = [], trainer.summarize

  def keep_final(run, state, *a, **kw):  # the state train() ends with, to compare in memory
    final.append(multihost_utils.process_allgather(state, tiled=True))
    return summarize(run, state, *a, **kw)

  trainer.summarize = keep_final
  ds, lines = dataset(data_path), []
  writes = record_writes(workdir)
  run = lambda **kw: trainer.train(cfg, workdir, dataset=ds, checkpoint_every=2, log_every=1,
                                   progress=False, print_fn=lines.append, **kw)
  if hosts:
    # Killed after step 3 on every host (their step functions raise when asked for step 4),
    # as the hosts' processes would be: then the same call resumes.
    setup = trainer.setup

    def dies_after_3(*a, **kw):
      r, state = setup(*a, **kw)
      step_fn, done = r.step_fn, [r.start]

      def step(*args):
        if done[0] >= 3:
          raise KeyboardInterrupt("killed")
        done[0] += 1
        return step_fn(*args)

      r.step_fn = step
      return r, state

    trainer.setup = dies_after_3
    try:
      run()
      raise AssertionError("the run was not killed after step 3")
    except KeyboardInterrupt:
      pass
    trainer.setup = setup
  summary = run()
  assert final, "train() did not end with summarize(run, state, ...)"
  trees = {"state": final[-1]}
  if not hosts and len(sys.argv) > 4 and sys.stdin.readline():
    _, _, restored, step = trainer.load_run(sys.argv[4])
    trees.update(restored=restored, restored_step=step)
  arrays = {name + jax.tree_util.keystr(k): np.asarray(v) for name, tree in trees.items()
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  np.savez(out, summary=json.dumps(summary), lines=json.dumps(lines),
           writes=json.dumps(sorted(set(writes))), devices=len(jax.devices()), **arrays)


if __name__ == "__main__":
  try:
    main()
  except BaseException:
    # Exit now: a normal exit would wait (minutes) at jax.distributed's shutdown barrier
    # for a host that may never reach it.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
