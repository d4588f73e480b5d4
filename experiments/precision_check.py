"""Accuracy effect of bfloat16 compute: the same NoProp runs in float32 and bfloat16, over seeds.

  python experiments/precision_check.py                          # dt ct fm diffusion_blocks on digits
  python experiments/precision_check.py --methods ct fm --seeds 3 --epochs 10 --out runs/precision.json
  python experiments/precision_check.py --methods dt --dataset mnist --data-dir ../shared/data/mnist \\
      --train-size 19200 --epochs 1

For each method and seed the two runs share the seed, so they see the same batches, noise
and dropout; they differ only in the compute dtype of the blocks (parameters, optimizer
state and the time or noise-level input stay float32 in both). The seeds give the noise
to compare the difference with: the table prints each precision's mean and standard
deviation over seeds, the mean of the paired differences and its standard error.
bfloat16 is for GPU/TPU: XLA:CPU emulates it, so on CPU it is slower, and this script only
measures its accuracy there. --out writes every run's figures as a results file (the
command, date, machine, versions and settings beside them).
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


from noprop_jax import data, host_memory
from noprop_jax import method as methods
from noprop_jax.config import RunConfig
from noprop_jax.trainer import train

import results  # experiments/ (the script's folder) is on sys.path
from reproduce import subset

PRECISIONS = ("float32", "bfloat16")


def run(method: str, precision: str, seed: int, ds, args) -> dict:
  cfg = RunConfig.create(method, dataset=args.dataset, epochs=args.epochs, seed=seed,
                         precision=precision, inference_steps=args.inference_steps)
  with tempfile.TemporaryDirectory() as d:
    s = train(cfg, d, dataset=ds, progress=False, print_fn=lambda _: None)
  return {"method": method, "precision": precision, "seed": seed, "epochs": s["epochs"],
          "test_accuracy_mean_path": s["test_accuracy_mean_path"],
          "test_accuracy_stochastic": s["test_accuracy_stochastic"],
          "train_seconds": s["train_seconds"]}


def _spread(values: list[float]) -> float:
  return statistics.stdev(values) if len(values) > 1 else float("nan")


def paired(rows: list[dict], method: str, key: str) -> dict:
  """One method's `key` over the seeds run in both precisions: each precision's mean and sd,
  and the paired bf16 - f32 difference's mean and standard error."""
  acc = {p: {r["seed"]: r[key] for r in rows if r["method"] == method and r["precision"] == p}
         for p in PRECISIONS}
  seeds = sorted(set(acc["float32"]) & set(acc["bfloat16"]))
  f32, b16 = [acc["float32"][s] for s in seeds], [acc["bfloat16"][s] for s in seeds]
  diff = [b - f for b, f in zip(b16, f32)]
  return {"float32": (statistics.mean(f32), _spread(f32)),
          "bfloat16": (statistics.mean(b16), _spread(b16)),
          "diff": (statistics.mean(diff), _spread(diff) / len(diff) ** 0.5), "seeds": len(seeds)}


def table(rows: list[dict], key: str) -> str:
  """Per method: each precision's mean ± sd over seeds, and the paired bf16 - f32
  difference's mean ± standard error."""
  out = [f"{'method':18s} {'float32':>16s} {'bfloat16':>16s} {'bf16 - f32':>18s} {'seeds':>5s}"]
  for method in dict.fromkeys(r["method"] for r in rows):
    c = paired(rows, method, key)
    cell = lambda v: f"{v[0]:.4f} ± {v[1]:.4f}"
    out.append(f"{method:18s} {cell(c['float32']):>16s} {cell(c['bfloat16']):>16s} "
               f"{c['diff'][0]:+.4f} ± {c['diff'][1]:.4f} {c['seeds']:5d}")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bf16 = [m.name for m in methods.registered() if m.bf16]
  p.add_argument("--methods", nargs="+", default=bf16, choices=bf16)
  p.add_argument("--dataset", default="digits")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--train-size", type=int, default=None, help="first N training images (all)")
  p.add_argument("--epochs", type=int, default=0, help="0: each method's default for the dataset")
  p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1, each run in both precisions")
  p.add_argument("--inference-steps", type=int, default=None, help="CT/FM")
  p.add_argument("--out", default=None, help="write every run's figures here (JSON)")
  args = p.parse_args(argv)
  if args.seeds < 1:
    p.error(f"--seeds must be >= 1, got {args.seeds}")
  ds = subset(data.load(args.dataset, args.data_dir), args.train_size)
  rows = []
  for method in args.methods:
    for seed in range(args.seeds):
      for precision in PRECISIONS:
        rows.append(run(method, precision, seed, ds, args))
        r = rows[-1]
        print(f"{method} seed {seed} {precision}: mean path {r['test_accuracy_mean_path']:.4f}, "
              f"sampled {r['test_accuracy_stochastic']:.4f}, {r['train_seconds']:.0f}s", flush=True)
  print(f"\n{ds.name} ({ds.source}), {len(ds.train.labels)} training examples; test accuracy, "
        "mean ± sd over seeds; bf16 - f32: mean ± standard error of the paired differences")
  for key, name in (("test_accuracy_mean_path", "mean path"), ("test_accuracy_stochastic", "sampled")):
    print(f"\n{name}\n{table(rows, key)}")
  if args.out:
    results.write(Path(args.out), __file__, argv, rows,
                  settings={"methods": args.methods, "dataset": ds.name, "source": ds.source,
                            "n_train": len(ds.train.labels), "epochs": args.epochs,
                            "seeds": args.seeds, "inference_steps": args.inference_steps},
                  host_memory=host_memory.status)
    print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
