"""Accuracy effect of bf16 compute: the same short NoProp run in float32 and bfloat16.

  python experiments/precision_check.py --data-dir ../shared/data/mnist --train-size 19200 --epochs 1

Both runs share the seed, so they see the same batches, noise and dropout; they
differ only in the compute dtype of the blocks (parameters and optimizer state
stay float32 in both). bfloat16 is for GPU/TPU: XLA:CPU emulates it, so on CPU
it is slower, and this script only measures its accuracy there.
"""

import argparse
import sys
import tempfile

from noprop_jax import data
from noprop_jax.config import RunConfig
from noprop_jax.trainer import train

from reproduce import subset  # experiments/ (the script's folder) is on sys.path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", default="dt")
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--train-size", type=int, default=None, help="first N training images (all)")
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--inference-steps", type=int, default=None, help="CT/FM")
  args = p.parse_args(argv)
  ds = subset(data.load(args.dataset, args.data_dir), args.train_size)
  rows = []
  for precision in ("float32", "bfloat16"):
    cfg = RunConfig.create(args.method, dataset=args.dataset, epochs=args.epochs,
                           precision=precision, inference_steps=args.inference_steps)
    with tempfile.TemporaryDirectory() as d:
      s = train(cfg, d, dataset=ds, progress=False)
    rows.append((precision, s["test_accuracy_mean_path"], s["test_accuracy_stochastic"],
                 s["train_seconds"]))
  print(f"\n{args.method} on {ds.name} ({ds.source}), {args.epochs} epoch(s), "
        f"{len(ds.train.labels)} training images")
  print(f"{'precision':10s} {'test acc (mean path)':>21s} {'test acc (sampled)':>19s} {'train s':>8s}")
  for r in rows:
    print(f"{r[0]:10s} {r[1]:21.4f} {r[2]:19.4f} {r[3]:8.1f}")
  print(f"bf16 - f32: {rows[1][1] - rows[0][1]:+.4f} (mean path), {rows[1][2] - rows[0][2]:+.4f} (sampled)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
