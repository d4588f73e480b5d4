"""NoProp, its successors and their baselines side by side, on the same blocks: one table.

  python experiments/compare.py --out runs/compare_digits                  # embedded digits, CPU minutes
  python experiments/compare.py --dataset mnist --data-dir ../shared/data/mnist --epochs 1 \\
      --out runs/compare_mnist
  python experiments/compare.py --dataset fashion_mnist --data-dir ~/data/fashion_mnist --epochs 1 \\
      --out runs/compare_fashion
  python experiments/compare.py --methods diffusion_blocks local --blocks paper --epochs 1 ...
  python experiments/compare.py --report-only --out runs/compare_mnist     # table what is finished

Rows are method x block: every registered method (NoProp-DT, -CT, -FM, DiffusionBlocks,
greedy local learning and the backprop and adjoint baselines, and one of your own with
--method-module MODULE), or those --methods names; blocks `paper` (the paper's CNN, with
its time input for time-conditioned methods) and `vit` (the library's small ViT). Every
other setting is the method's default (`RunConfig.create`), with --epochs for all rows
and --inference-steps for the methods that have that setting. Columns: test accuracy (the
mean path, from z = 0: the headline), test accuracy from sampled starts (the mean over the
inference runs; DiffusionBlocks' authors sample z ~ N(0, (1 + sigma_max^2) I)), training
seconds per epoch, XLA's
memory analysis of one compiled training step (arguments + outputs - donated +
temporaries, batch --batch-size), and the block calls needed to classify a batch.

Each row trains in OUT/runs/<method>_<block> (rerunning resumes; finished rows are
kept). OUT/results.md and OUT/results.json hold the table of every finished row;
--results FILE also writes them as a results file (the command, date, machine, versions and
settings beside the rows), which `render_results.py` renders into the documentation.
"""

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import jax

from noprop_jax import cli, core, host_memory, trainer
from noprop_jax import method as methods
from noprop_jax.config import RunConfig
import results as results_file
from reproduce import Datasets, fmt_duration

BLOCKS = ("paper", "vit")


def row_config(method: str, block: str, dataset: str, epochs: int | None,
               inference_steps: int | None, batch_size: int, seed: int = 0) -> RunConfig:
  settings = dict(dataset=dataset, block=block, epochs=epochs, batch_size=batch_size, seed=seed,
                  inference_runs=1)
  if "inference_steps" in methods.get(method).resumable:  # inference only (not the adjoint's)
    settings["inference_steps"] = inference_steps
  return RunConfig.create(method, **settings)


def step_memory(cfg: RunConfig, input_shape, num_classes: int) -> int | None:
  """XLA's memory analysis of the row's jitted training step on one batch, state donated."""
  compute = trainer.resolve_compute(cfg)
  model = trainer.build_model(cfg, input_shape, num_classes, compute)
  method = cfg.method_record
  state = jax.eval_shape(lambda: trainer.init_state(cfg, model, jax.random.key(0)))
  B = cfg.train.batch_size
  x = jax.ShapeDtypeStruct((B, *input_shape), jax.numpy.uint8)
  y = jax.ShapeDtypeStruct((B,), jax.numpy.int32)
  step = jax.jit(partial(method.train_step, model, cfg.train.optim, compute), donate_argnums=0)
  return core.peak_bytes(step.lower(state, x, y).compile())


def run_row(cfg: RunConfig, workdir: Path, ds, print_fn=print) -> dict:
  """Train (or resume) one row and return its table entry."""
  if (workdir / "summary.json").exists():
    s = json.loads((workdir / "summary.json").read_text())
  else:
    s = trainer.train(cfg, workdir, dataset=ds, progress=False, print_fn=print_fn)
  compute = trainer.resolve_compute(cfg)
  shape, m = tuple(s["input_shape"]), s["num_classes"]
  model = trainer.build_model(cfg, shape, m, compute)
  return {"method": cfg.method, "block": cfg.block.block,
          "test_accuracy": s["test_accuracy_mean_path"],
          "test_accuracy_stochastic": s["test_accuracy_stochastic"],
          "seconds_per_epoch": s["train_seconds"] / max(s["epochs"], 1e-9),
          "epochs": s["epochs"], "params_per_block": s["params_per_block"],
          "step_memory_bytes": step_memory(cfg, shape, m),
          "block_calls": cfg.method_record.block_calls(model),
          "blocks": cfg.T, "dataset": s["data_source"], "backend": s["backend"]}


TABLE_NOTE = (
    "test acc: the headline, the deterministic mean path (inference from z = 0, no noise "
    "added). sampled: the mean over the run's sampled inference paths, each started from the "
    "method's own noise (NoProp-DT: z_0 ~ N(0, I) and noise at every step; DiffusionBlocks: "
    "z ~ N(0, (1 + sigma_max^2) I), as its authors sample, where z = 0 feeds the later blocks "
    "inputs far smaller than they saw in training).")


def table(results: list[dict]) -> str:
  rows = ["| method | block | test acc | sampled | s / epoch | memory / step | block calls | "
          "params / block |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    mem = r["step_memory_bytes"]
    sampled = r.get("test_accuracy_stochastic")
    rows.append(f"| {methods.get(r['method']).title} | {r['block']} | {100 * r['test_accuracy']:.2f} | "
                f"{'n/a' if sampled is None else f'{100 * sampled:.2f}'} | "
                f"{fmt_duration(r['seconds_per_epoch'])} | "
                f"{'n/a' if mem is None else f'{mem / 2**20:.0f} MiB'} | {r['block_calls']} | "
                f"{r['params_per_block']:,} |")
  return "\n".join(rows) + "\n\n" + TABLE_NOTE


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,  # see --method-module
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="digits", help="digits (embedded), mnist, fashion_mnist, ...")
  p.add_argument("--data-dir", default=None, help="the dataset's original files (else TFDS)")
  p.add_argument("--method-module", action="append", default=[], metavar="MODULE",
                 help="a module (name or .py file) that registers a method of your own; may repeat")
  p.add_argument("--methods", nargs="+", default=list(methods.names()), choices=methods.names(),
                 help="rows' methods (default: every registered method)")
  p.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=BLOCKS)
  p.add_argument("--epochs", type=int, default=None, help="every row's epochs (default: the method's)")
  p.add_argument("--inference-steps", type=int, default=None,
                 help="inference's Euler steps, for the methods where they are inference "
                 "only (ct, fm; default: theirs)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--train-size", type=int, default=None, help="the first N training examples only")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/compare")
  p.add_argument("--report-only", action="store_true", help="table the finished rows; train none")
  p.add_argument("--results", default=None, metavar="FILE",
                 help="also write the rows as a results file (JSON with command, date, machine, "
                 "versions and settings)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  try:  # a method of one's own registers before --methods' choices are made
    cli.import_method_modules(sys.argv[1:] if argv is None else list(argv))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args = parse_args(argv)
  for name in ("epochs", "inference_steps", "train_size"):
    v = getattr(args, name)
    if v is not None and v < 1:
      print(f"error: --{name.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
      return 2
  out = Path(args.out)
  datasets = Datasets(args.data_dir, train_size=args.train_size)
  results, failed = [], []
  for method in [m for m in methods.names() if m in args.methods]:
    for block in [b for b in BLOCKS if b in args.blocks]:
      tag, workdir = f"[{method} {block}]", out / "runs" / f"{method}_{block}"
      if args.report_only and not (workdir / "summary.json").exists():
        continue
      try:
        cfg = row_config(method, block, args.dataset, args.epochs, args.inference_steps,
                         args.batch_size, args.seed)
        r = run_row(cfg, workdir, datasets.get(args.dataset),
                    lambda msg: print(f"{tag} {msg}", flush=True))
      except Exception as e:  # one row's failure stops only that row
        print(f"{tag} error: {type(e).__name__}: {e}", file=sys.stderr)
        failed.append(f"{method}/{block}")
        continue
      results.append(r)
      print(f"{tag} test accuracy {r['test_accuracy']:.4f}, {r['seconds_per_epoch']:.0f} s per "
            f"epoch", flush=True)
      out.mkdir(parents=True, exist_ok=True)
      (out / "results.json").write_text(json.dumps(results, indent=1))
      (out / "results.md").write_text(
          f"`python experiments/compare.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
          + table(results) + "\n")
  print(table(results))
  if args.results and results:
    results_file.write(
        Path(args.results), __file__, argv, results,
        settings={k: getattr(args, k) for k in ("dataset", "methods", "blocks", "epochs",
                                                "inference_steps", "batch_size", "train_size",
                                                "seed")}, failed=failed,
        note=TABLE_NOTE)
  if failed:
    print(f"error: rows that failed: {' '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
