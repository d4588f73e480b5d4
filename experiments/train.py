"""Train one method on one dataset; writes metrics.jsonl, summary.json and checkpoints.

  python experiments/train.py                      # NoProp-DT on the embedded digits
  python experiments/train.py --dataset mnist --data-dir ../shared/data/mnist --epochs 1 --workdir runs/mnist
  python experiments/train.py --method fm --dataset mnist --data-dir ../shared/data/mnist --epochs 5 --workdir runs/fm
  python experiments/train.py --method backprop --dataset my_arrays.npz --block mlp --workdir runs/bp
  python experiments/train.py --method-module my_method.py --method mine --workdir runs/mine

--dataset is a named dataset or a .npz file of your own arrays (x_train, y_train,
x_test, y_test; any input shape, any number of classes). Defaults follow the paper's
Table 4; every flag overrides. Rerunning with the same --workdir resumes. --method-module
imports a module that registers a method of your own (noprop_jax.method.register) first:
its settings then have flags too.

SIGTERM or SIGINT (Ctrl-C) stops the run cleanly after the step in flight, with a
checkpoint of that step; a second one stops at once. Exit codes: 0 trained; 1 an error
(one line); 2 bad flags, or the other hosts cannot be joined; 69 another host's process
was lost (rerun every host to resume); 75 stopped on a signal, checkpointed (rerun to
resume); 130 stopped at once by a second signal (rerun resumes from the last checkpoint).
"""

import argparse
import errno
import os
import sys
from pathlib import Path

from noprop_jax import cli, host_memory

def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


class Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, like every other error here (argparse adds its usage)
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def parser() -> argparse.ArgumentParser:
  # No abbreviated flags: --method-module is read before the parser exists (it registers
  # methods whose settings become flags), under its full name only.
  p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
             allow_abbrev=False)
  cli.add_flags(p)
  p.add_argument("--workdir", default="runs/default", help="checkpoints, metrics.jsonl, summary.json")
  p.add_argument("--checkpoint-every", type=positive_int, default=200, help="also checkpoint every N steps mid-epoch")
  p.add_argument("--keep-checkpoints", type=positive_int, default=2, metavar="N",
                 help="keep the newest N checkpoints (default 2); the disk must hold N + 1 "
                 "while the next is written, which the run checks before it starts")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--distributed", action="store_true", help="multi-host: join the other "
                 "processes first (noprop_jax.distributed.initialize); run the same command on "
                 "every host, with the same --workdir on a shared filesystem. Without the three "
                 "flags below (or their JAX_* variables) JAX detects the cluster (SLURM, Open "
                 "MPI, TPU VM). When a process is lost, the others stop with exit code 69 and "
                 "one line naming it; rerun all to resume")
  p.add_argument("--coordinator-address", metavar="HOST:PORT", help="multi-host: process 0's "
                 "host and a free port (default: $JAX_COORDINATOR_ADDRESS); implies --distributed")
  p.add_argument("--num-processes", type=positive_int, metavar="N", help="multi-host: the "
                 "number of processes (default: $JAX_NUM_PROCESSES); implies --distributed")
  p.add_argument("--process-id", type=int, metavar="I", help="multi-host: this process's id, "
                 "0 to N-1, 0 where the coordinator runs (default: $JAX_PROCESS_ID); implies "
                 "--distributed")
  p.add_argument("--heartbeat-timeout", type=positive_int, default=60, metavar="SECONDS",
                 help="multi-host: a process whose host vanishes without closing its "
                 "connections counts as lost after this long (default: 60); one that dies is "
                 "noticed as soon as its connections close")
  p.add_argument("--flag-table", action="store_true", help="print the settings' markdown table and exit")
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:  # a method of one's own registers before the flags are made from the registry
    cli.import_method_modules(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    args = parser().parse_args(argv)
  except SystemExit as e:  # --help, or a malformed flag (already reported)
    return e.code
  if args.flag_table:
    print(cli.flag_table())
    return 0
  from noprop_jax import distributed  # its guard(train) below: a lost process, one line

  if args.distributed or any(v is not None for v in (args.coordinator_address,
                                                     args.num_processes, args.process_id)):
    try:  # before anything touches a backend
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                             heartbeat_timeout=args.heartbeat_timeout)
    except distributed.DistributedError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    distributed.watch(args.workdir)
  try:
    cfg = cli.from_args(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from noprop_jax.data import DataError
  from noprop_jax.stopping import EXIT_STOPPED, StopNow, Stopped
  from noprop_jax.trainer import NonFiniteLossError, train
  from noprop_jax.workdir import WorkdirError

  try:
    s = distributed.guard(train)(cfg, args.workdir, checkpoint_every=args.checkpoint_every,
                                 progress=not args.no_progress,
                                 keep_checkpoints=args.keep_checkpoints)
  except Stopped as e:  # SIGTERM, SIGINT: checkpointed at the step it stopped
    print(e, flush=True)
    return EXIT_STOPPED
  except StopNow:  # a second signal: at once, not waiting for a save in flight
    sys.stdout.flush()
    print(f"stopped at once by a second signal; the checkpoints written before it are intact: "
          f"run the same command again to resume from the newest in {args.workdir}",
          file=sys.stderr, flush=True)
    os._exit(130)
  except (FileNotFoundError, DataError, WorkdirError, NonFiniteLossError, ValueError,
          MemoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # the disk: full, gone, read-only (the workdir's own checks come first)
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    print(f"error: {e.strerror or e} ({e.filename or args.workdir})"
          + ("; free space there (or use another --workdir), then rerun the same command to "
             "resume from the last checkpoint" if full else ""), file=sys.stderr)
    return 1
  print(f"test accuracy {s['test_accuracy']:.4f} ({s['inference']}; mean path "
        f"{s['test_accuracy_mean_path']:.4f}, stochastic {s['test_accuracy_stochastic']:.4f} "
        f"averaged over {len(s['test_accuracy_stochastic_runs'])} runs); "
        f"summary in {Path(args.workdir) / 'summary.json'}")
  return 0


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
