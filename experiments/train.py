"""Train NoProp on one dataset; writes metrics.jsonl, summary.json and checkpoints.

  python experiments/train.py                      # NoProp-DT on the embedded digits
  python experiments/train.py --dataset mnist --data-dir ../shared/data/mnist --epochs 1 --workdir runs/mnist
  python experiments/train.py --method fm --dataset mnist --data-dir ../shared/data/mnist --epochs 5 --workdir runs/fm
  python experiments/train.py --method backprop --dataset mnist --data-dir ../shared/data/mnist --epochs 1 --workdir runs/bp

Defaults follow the paper's Table 4 for the chosen dataset; every flag overrides.
Rerunning with the same --workdir resumes from the last checkpoint.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from noprop_jax.config import (CLASSIFIERS, CONV_IMPLS, CT_SAMPLERS, DATASETS, EMBEDDINGS,
                               FORMULATIONS, INFERENCE_MODES, METHODS, PRECISIONS, TRAININGS, Config)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--method", default="dt", help="|".join(METHODS) + " (NoProp-DT, -CT, -FM; the back-propagation "
    "and adjoint baselines)")
  a("--dataset", default="digits", help="|".join(DATASETS))
  a("--data-dir", default=None, help="directory with the dataset's original files; else TFDS")
  a("--no-verify", action="store_true", help="skip checksum verification of --data-dir files")
  a("--embedding", default=None, help="|".join(EMBEDDINGS) + " (default onehot; prototype: "
    "d = image size, initialised to each class's medoid training image)")
  a("--embedding-dim", type=int, default=None, help="learned embedding size (default 20)")
  a("--classifier", default=None, help="DT: " + "|".join(CLASSIFIERS) + " p(y | z_T) (Eq. 14 or "
    "15-16; default softmax)")
  a("--radial-sigma", type=float, default=None, help="DT radial classifier's sigma (default 1)")
  a("--T", type=int, default=None, help="DT: number of blocks (default 10)")
  a("--epochs", type=int, default=None, help="default: paper Table 4 for the method and dataset")
  a("--batch-size", type=int, default=None, help="default 128")
  a("--lr", type=float, default=None, help="learning rate (default 1e-3; DT AdamW, CT/FM Adam)")
  a("--weight-decay", type=float, default=None, help="weight decay (default 1e-3)")
  a("--eta", type=float, default=None, help="denoising loss weight (default DT 0.1, CT 1)")
  a("--grad-clip", type=float, default=None, help="gradient-norm clip per block (DT) or per "
    "parameter group (CT/FM) (default 1, 0: off)")
  a("--dropout", type=float, default=None, help="dropout rate in the image pathway (default 0.2)")
  a("--seed", type=int, default=None, help="default 0")
  a("--training", default=None, help="parallel (all blocks every step) | sequential (Algorithm 1)")
  a("--formulation", default=None, help="|".join(FORMULATIONS) + ": how the parallel step maps "
    "over blocks (auto: unroll on CPU, vmap on GPU/TPU)")
  a("--blocks-per-step", type=int, default=None, help="DT: blocks computed at once in a step, a "
    "divisor of T; fewer use less memory, the rest run one chunk after another in the same "
    "step (default 0: automatic, all T where they fit in device memory)")
  a("--mesh", default=None, help="device mesh, e.g. blocks=4,data=2: DT's blocks split over "
    "'blocks', batches over 'data' (CT/FM/baselines: data only; default: one device)")
  a("--precision", default=None, help="|".join(PRECISIONS) + ": compute dtype (bfloat16 keeps "
    "float32 parameters and optimizer state; for GPU/TPU)")
  a("--conv-impl", default=None, help="|".join(CONV_IMPLS))
  a("--inference", default=None, help="|".join(INFERENCE_MODES) + ": mode of test_accuracy "
    "(default mean)")
  a("--inference-runs", type=int, default=None, help="stochastic runs to average (default 5)")
  a("--eval-every", type=int, default=None, help="epochs between test evaluations (default 1; "
    "CT/FM on digits 5); the last epoch always evaluates")
  a("--inference-steps", type=int, default=None, help="CT/FM: Euler steps from t=0 to 1 at "
    "inference; adjoint: also in training (default 1000)")
  a("--ct-sampler", default=None, help="CT: " + "|".join(CT_SAMPLERS) + " (probability-flow ODE, "
    "default; or reverse SDE, Euler-Maruyama, for the stochastic runs)")
  a("--fm-sigma", type=float, default=None, help="FM: noise std around the straight path (default 0)")
  a("--gamma-0-init", type=float, default=None, help="CT: initial gamma at t=1, the label end (default -3.5)")
  a("--gamma-1-init", type=float, default=None, help="CT: initial gamma at t=0, the noise end (default 3.5)")
  a("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() "
    "first (TPU pods, SLURM/Open MPI GPU clusters find the coordinator themselves); run the "
    "same command on every host, with the same --workdir on a shared filesystem")
  a("--workdir", default="runs/default", help="checkpoints, metrics.jsonl, summary.json")
  a("--checkpoint-every", type=int, default=200, help="also checkpoint every N steps mid-epoch")
  a("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.distributed:
    import jax

    jax.distributed.initialize()  # before anything touches a backend
  names = ("method", "dataset", "embedding", "embedding_dim", "classifier", "radial_sigma", "T", "epochs", "batch_size", "lr",
           "weight_decay", "eta", "grad_clip", "dropout", "seed", "training", "formulation",
           "blocks_per_step", "mesh", "precision", "conv_impl", "inference", "inference_runs", "eval_every", "inference_steps", "ct_sampler", "fm_sigma",
           "gamma_0_init", "gamma_1_init")
  try:
    cfg = Config.create(**{n: getattr(args, n) for n in names})
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from noprop_jax.checkpoint import ConfigMismatchError
  from noprop_jax.data import DataError
  from noprop_jax.trainer import NonFiniteLossError, train

  try:
    s = train(cfg, args.workdir, args.data_dir, verify=not args.no_verify,
              checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
  except (FileNotFoundError, DataError, ConfigMismatchError, NonFiniteLossError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"test accuracy {s['test_accuracy']:.4f} ({s['inference']}; mean path "
        f"{s['test_accuracy_mean_path']:.4f}, stochastic {s['test_accuracy_stochastic']:.4f} "
        f"averaged over {len(s['test_accuracy_stochastic_runs'])} runs); "
        f"summary in {Path(args.workdir) / 'summary.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
