"""Training memory of one step per method, like the paper's Table 3.

  python experiments/memory_benchmark.py                          # MNIST shapes, batch 128
  python experiments/memory_benchmark.py --dataset cifar10 --json
  python experiments/memory_benchmark.py --adjoint-steps 10 100 1000 --methods adjoint

For every method, the jitted training step (state donated, as in training) is
compiled for the paper's batch size and XLA's compiled memory analysis gives
its argument, output, aliased and temporary bytes; "peak" is arguments +
outputs - aliased + temporaries, what the program needs at once. This works on
every backend, CPU included, without running the step. Where the backend
reports device memory (GPU/TPU), each method also runs in a fresh process and
its device peak (`peak_bytes_in_use`) is reported. Ratios are to backprop.

NoProp-DT appears in each formulation: 'scan' trains the blocks one after
another inside the step (the memory of one block), 'vmap' and 'unroll' all at
once; 'one block per step' is the paper's Algorithm 1. The adjoint is compiled
at several numbers of solver steps beside back-propagation through the same
solve, to show which one is flat.
"""

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from noprop_jax import adjoint, backprop, continuous, dt, trainer
from noprop_jax.config import Config

PAPER_GB = {  # paper Table 3, GPU memory in training (GB): MNIST, CIFAR-10, CIFAR-100
    "backprop": (0.87, 1.17, 1.73), "dt": (0.49, 0.64, 1.23), "adjoint": (2.32, 6.23, 6.45)}
PAPER_COLUMN = {"mnist": 0, "cifar10": 1, "cifar100": 2}


def cases(dataset: str, batch: int, adjoint_steps: list[int]) -> dict[str, tuple[Config, callable]]:
  """name -> (config, step function (state, x, y) -> (state, metrics))."""
  base = dict(dataset=dataset, batch_size=batch)
  out = {"backprop": (Config.create(method="backprop", **base), backprop.train_step)}
  for form in ("scan", "unroll", "vmap"):
    out[f"dt/{form}"] = (Config.create(formulation=form, **base), dt.parallel_step)
  seq_cfg = Config.create(training="sequential", **base)
  out["dt/one block per step"] = (seq_cfg, lambda cfg, s, x, y: dt.sequential_step(
      cfg, s, x, y, s["step"] % cfg.T))
  for m in ("ct", "fm"):
    out[m] = (Config.create(method=m, **base), continuous.train_step)
  for n in adjoint_steps:
    cfg = Config.create(method="adjoint", inference_steps=n, **base)
    out[f"adjoint/{n} steps"] = (cfg, adjoint.train_step)
    out[f"backprop through the solve/{n} steps"] = (
        cfg, lambda cfg, s, x, y: adjoint.train_step(cfg, s, x, y, adjoint=False))
  return out


def _inputs(cfg: Config):
  state = jax.eval_shape(lambda k: trainer.init_state(cfg, k), jax.random.key(0))
  x = jax.ShapeDtypeStruct((cfg.batch_size, *cfg.image_shape), jnp.uint8)
  y = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)
  return state, x, y


def analyse(cfg: Config, step) -> dict[str, float]:
  """XLA's compiled memory analysis of the donated training step, in bytes."""
  fn = jax.jit(partial(step, cfg), donate_argnums=0)
  m = fn.lower(*_inputs(cfg)).compile().memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
          "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes, "peak": peak}


def device_peak(cfg: Config, step) -> int | None:
  """Peak device bytes in use after initialising and running the step twice (GPU/TPU)."""
  dev = jax.devices()[0]
  if not (dev.memory_stats() or {}).get("peak_bytes_in_use"):
    return None
  state = trainer.init_state(cfg, jax.random.key(0))
  x = jnp.zeros((cfg.batch_size, *cfg.image_shape), jnp.uint8)
  y = jnp.zeros((cfg.batch_size,), jnp.int32)
  fn = jax.jit(partial(step, cfg), donate_argnums=0)
  for _ in range(2):
    state, metrics = fn(state, x, y)
  jax.block_until_ready(metrics)
  return int(dev.memory_stats()["peak_bytes_in_use"])


def _fresh_process_peak(args, name: str) -> int | None:
  """The device peak of one case measured alone, in a new process (peaks never reset)."""
  cmd = [sys.executable, __file__, "--dataset", args.dataset, "--batch-size", str(args.batch_size),
         "--adjoint-steps", *map(str, args.adjoint_steps), "--device-peak-of", name]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
  return json.loads(out.splitlines()[-1])["device_peak"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--batch-size", type=int, default=128, help="paper: 128")
  p.add_argument("--adjoint-steps", type=int, nargs="+", default=[10, 100, 1000])
  p.add_argument("--methods", nargs="+", default=None, help="name prefixes to keep (default all)")
  p.add_argument("--json", action="store_true", help="also print one JSON object per case")
  p.add_argument("--device-peak-of", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  all_cases = cases(args.dataset, args.batch_size, args.adjoint_steps)
  if args.device_peak_of:  # child process: one case's device peak
    print(json.dumps({"device_peak": device_peak(*all_cases[args.device_peak_of])}))
    return
  keep = [n for n in all_cases if not args.methods or any(n.startswith(m) for m in args.methods)]
  has_device_stats = bool((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"))
  col = PAPER_COLUMN.get(args.dataset)
  rows = []
  for name in keep:
    cfg, step = all_cases[name]
    r = {"case": name, "dataset": args.dataset, "batch_size": args.batch_size,
         "backend": jax.default_backend(), **analyse(cfg, step)}
    r["device_peak"] = _fresh_process_peak(args, name) if has_device_stats else None
    method = name.split("/")[0]
    r["paper_gb"] = PAPER_GB[method][col] if method in PAPER_GB and col is not None else None
    rows.append(r)
  ref = next((r for r in rows if r["case"] == "backprop"), None)
  mb = lambda b: f"{b / 2**20:9.1f}" if b is not None else f"{'n/a':>9s}"
  print(f"training-step memory, {args.dataset} shapes, batch {args.batch_size}, backend "
        f"{jax.default_backend()} (MiB; peak = arguments + outputs - aliased + temporaries)")
  print(f"{'case':38s} {'temp':>9s} {'peak':>9s} {'device':>9s} {'/backprop':>9s} {'paper GB':>8s}")
  for r in rows:
    if ref:
      key = "device_peak" if r["device_peak"] and ref["device_peak"] else "peak"
      r["ratio_to_backprop"] = r[key] / ref[key]
    ratio = f"{r['ratio_to_backprop']:9.2f}" if ref else f"{'':9s}"
    paper = f"{r['paper_gb']:8.2f}" if r["paper_gb"] is not None else f"{'':8s}"
    print(f"{r['case']:38s} {mb(r['temp'])} {mb(r['peak'])} {mb(r['device_peak'])} {ratio} {paper}")
  if args.json:
    for r in rows:
      print(json.dumps(r))


if __name__ == "__main__":
  main()
