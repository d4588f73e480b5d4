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
solve, to show which one is flat. Back-propagation also appears rematerialised
per block (jax.checkpoint: each block's activations recomputed in the backward
pass), the fair memory baseline for local learning: every case's ratio to it is printed
beside its ratio to plain back-propagation, and both back-propagation steps are timed
(alternately, --time-repeats each) for rematerialisation's cost in step time.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

import results
from noprop_jax import adjoint, backprop, core, dt, host_memory, solvers, trainer
from noprop_jax import method as methods
from noprop_jax.config import RunConfig

PAPER_GB = {  # paper Table 3, GPU memory in training (GB): MNIST, CIFAR-10, CIFAR-100
    "backprop": (0.87, 1.17, 1.73), "dt": (0.49, 0.64, 1.23), "adjoint": (2.32, 6.23, 6.45)}
PAPER_COLUMN = {"mnist": 0, "cifar10": 1, "cifar100": 2}
# (input shape, number of classes) of the named datasets: the steps compile for these shapes.
SHAPES = {"digits": ((8, 8, 1), 10), "mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
          "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
          "tiny_imagenet": ((64, 64, 3), 200)}

# step(model, optim, compute, state, x, y) -> (state, metrics), as the methods' train_step.
Step = Callable


def algorithm1_step(model, optim, compute, state, x, y):
  """NoProp-DT's Algorithm 1: the step updates block step % T only."""
  return dt.sequential_step(model, optim, compute, state, x, y, state["step"] % model.T)


def through_the_solve_step(model, optim, compute, state, x, y):
  """The adjoint baseline's step with the gradient back-propagated through the Euler
  solve (`solvers.euler`) instead of the adjoint ODE: memory grows with the steps."""

  def objective(params, state, x, y, key):
    value, metrics = adjoint.loss(model, params, x, y, key, solve=solvers.euler)
    return value, (metrics, {})

  state, value, m = core.gradient_step(objective, adjoint.optimizer(optim), state, x, y,
                                        model.num_classes)
  return state, {"loss": value, "rate": jnp.exp(state["params"]["log_rate"]), **m}


def cases(dataset: str, batch: int, adjoint_steps: list[int]) -> dict[str, tuple[RunConfig, Step]]:
  """name -> (config, step function (model, optim, compute, state, x, y) -> (state, metrics))."""
  base = dict(dataset=dataset, batch_size=batch)
  out = {"backprop": (RunConfig.create("backprop", **base), backprop.train_step),
         # The fair baseline for local learning: activations recomputed block by block
         # (on a lax.scan chain: XLA:CPU schedules an unrolled one no lower).
         "backprop, rematerialised per block": (
             RunConfig.create("backprop", remat=True, formulation="scan", **base),
             backprop.train_step)}
  for form in ("scan", "unroll", "vmap"):
    out[f"dt/{form}"] = (RunConfig.create("dt", formulation=form, **base), dt.train_step)
  out["dt/one block per step"] = (RunConfig.create("dt", training="sequential", **base),
                                  algorithm1_step)
  for m in ("ct", "fm"):
    out[m] = (RunConfig.create(m, **base), methods.get(m).train_step)
  for n in adjoint_steps:
    cfg = RunConfig.create("adjoint", inference_steps=n, **base)
    out[f"adjoint/{n} steps"] = (cfg, adjoint.train_step)
    out[f"backprop through the solve/{n} steps"] = (cfg, through_the_solve_step)
  return out


def _build(cfg: RunConfig, step: Step):
  """(model, jitted step (state, x, y) -> (state, metrics) with the state donated)."""
  shape, m = SHAPES[cfg.data.dataset]
  compute = trainer.resolve_compute(cfg)
  model = trainer.build_model(cfg, shape, m, compute)
  fn = jax.jit(lambda s, x, y: step(model, cfg.train.optim, compute, s, x, y), donate_argnums=0)
  return model, fn


def _inputs(cfg: RunConfig, model):
  state = jax.eval_shape(lambda k: trainer.init_state(cfg, model, k), jax.random.key(0))
  x = jax.ShapeDtypeStruct((cfg.train.batch_size, *model.input_shape), jnp.uint8)
  y = jax.ShapeDtypeStruct((cfg.train.batch_size,), jnp.int32)
  return state, x, y


def analyse(cfg: RunConfig, step: Step) -> dict[str, float]:
  """XLA's compiled memory analysis of the donated training step, in bytes."""
  model, fn = _build(cfg, step)
  compiled = fn.lower(*_inputs(cfg, model)).compile()
  m = compiled.memory_analysis()
  return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
          "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
          "peak": core.peak_bytes(compiled)}


def reports_peak() -> bool:
  """Whether the device reports its peak bytes in use (GPU/TPU; 0 in a fresh process)."""
  return "peak_bytes_in_use" in (jax.devices()[0].memory_stats() or {})


def device_peak(cfg: RunConfig, step: Step) -> int | None:
  """Peak device bytes in use after initialising and running the step twice (GPU/TPU)."""
  dev = jax.devices()[0]
  if not reports_peak():
    return None
  model, fn = _build(cfg, step)
  state = trainer.init_state(cfg, model, jax.random.key(0))
  x = jnp.zeros((cfg.train.batch_size, *model.input_shape), jnp.uint8)
  y = jnp.zeros((cfg.train.batch_size,), jnp.int32)
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


REMAT = "backprop, rematerialised per block"


def step_times(all_cases: dict, names: list[str], repeats: int) -> dict[str, list[float]]:
  """Seconds of `repeats` steps of each case, timed alternately (one step of each in
  turn, each waited for) after a warm-up step: a shared machine's drift hits both alike."""
  runs = {}
  for name in names:
    cfg, step = all_cases[name]
    model, fn = _build(cfg, step)
    state = trainer.init_state(cfg, model, jax.random.key(0))
    x = jnp.zeros((cfg.train.batch_size, *model.input_shape), jnp.uint8)
    y = jnp.zeros((cfg.train.batch_size,), jnp.int32)
    compiled = fn.lower(state, x, y).compile()
    state, _ = jax.block_until_ready(compiled(state, x, y))
    runs[name] = [compiled, state, x, y, []]
  for _ in range(repeats):
    for run in runs.values():
      compiled, state, x, y, times = run
      t0 = time.perf_counter()
      run[1], _ = jax.block_until_ready(compiled(state, x, y))
      times.append(time.perf_counter() - t0)
  return {name: run[4] for name, run in runs.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="mnist", choices=list(SHAPES))
  p.add_argument("--batch-size", type=int, default=128, help="paper: 128")
  p.add_argument("--adjoint-steps", type=int, nargs="+", default=[10, 100, 1000])
  p.add_argument("--methods", nargs="+", default=None, help="name prefixes to keep (default all)")
  p.add_argument("--json", action="store_true", help="also print one JSON object per case")
  p.add_argument("--out", type=Path, default=None, help="write the rows to this results file "
                 "(JSON: command, date, machine, versions, settings)")
  p.add_argument("--time-repeats", type=int, default=5, help="timed steps of each back-"
                 "propagation case (rematerialisation's cost); 0: no timing")
  p.add_argument("--device-peak-of", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  all_cases = cases(args.dataset, args.batch_size, args.adjoint_steps)
  if args.device_peak_of:  # child process: one case's device peak
    print(json.dumps({"device_peak": device_peak(*all_cases[args.device_peak_of])}))
    return
  keep = [n for n in all_cases if not args.methods or any(n.startswith(m) for m in args.methods)]
  has_device_stats = reports_peak()
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
  refs = {"ratio_to_backprop": next((r for r in rows if r["case"] == "backprop"), None),
          "ratio_to_remat": next((r for r in rows if r["case"] == REMAT), None)}
  mb = lambda b: f"{b / 2**20:9.1f}" if b is not None else f"{'n/a':>9s}"
  print(f"training-step memory, {args.dataset} shapes, batch {args.batch_size}, backend "
        f"{jax.default_backend()} (MiB; peak = arguments + outputs - aliased + temporaries)")
  print(f"{'case':38s} {'temp':>9s} {'peak':>9s} {'device':>9s} {'/backprop':>9s} {'/remat':>7s} "
        f"{'paper GB':>8s}")
  for r in rows:
    cols = []
    for field, ref in refs.items():
      if ref:  # the device's peaks where both have one, else XLA's
        key = "device_peak" if r["device_peak"] and ref["device_peak"] else "peak"
        r[field] = r[key] / ref[key]
      cols.append(f"{r[field]:{9 if field == 'ratio_to_backprop' else 7}.2f}" if ref
                  else " " * (9 if field == "ratio_to_backprop" else 7))
    paper = f"{r['paper_gb']:8.2f}" if r["paper_gb"] is not None else f"{'':8s}"
    print(f"{r['case']:38s} {mb(r['temp'])} {mb(r['peak'])} {mb(r['device_peak'])} {' '.join(cols)} {paper}")
  timing = None
  if args.time_repeats and all(refs.values()):
    times = step_times(all_cases, ["backprop", REMAT], args.time_repeats)
    med = {n: statistics.median(t) for n, t in times.items()}
    timing = {"table": "remat_cost", "repeats": args.time_repeats,
              **{f"{k}_s_{q}": f(times[n]) for k, n in (("backprop", "backprop"), ("remat", REMAT))
                 for q, f in (("min", min), ("median", statistics.median), ("max", max))},
              "remat_over_backprop": med[REMAT] / med["backprop"]}
    print(f"step time (median of {args.time_repeats}, timed alternately): backprop "
          f"{1e3 * med['backprop']:.1f} ms, rematerialised per block {1e3 * med[REMAT]:.1f} ms: "
          f"rematerialisation costs {timing['remat_over_backprop']:.2f}x the step time")
  if args.json:
    for r in rows + ([timing] if timing else []):
      print(json.dumps(r))
  if args.out:
    results.write(args.out, __file__, argv, rows + ([timing] if timing else []),
                  {k: v for k, v in vars(args).items() if k not in ("device_peak_of", "out", "json")},
                  jax.default_backend(), jax.devices()[0].device_kind)
    print(f"results: {args.out}")


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  main()
