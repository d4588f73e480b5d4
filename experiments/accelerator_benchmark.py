"""The accelerator benchmark: parallel block training against one block at a time,
back-propagation and PyTorch, on one device, in one command, written to a results file.

  python experiments/accelerator_benchmark.py              # a GPU: about 8 minutes on one H100
  python experiments/accelerator_benchmark.py --tiny       # any backend, tiny sizes: seconds

Sections, for each dataset's shapes (MNIST, CIFAR-10; random data, the paper's block,
batch 128, T = 10) and precision (float32, bfloat16):
  1. training steps: the parallel step of all T blocks in each formulation (vmap, unroll,
     chunks of one block in a scan) and as `auto` resolves it, Algorithm 1 (one block
     per step, timed x T), back-propagation, and back-propagation rematerialised per
     block; then whether `auto` is within 10% of the fastest parallel row;
  2. inference: NoProp-DT (mean path) and NoProp-FM (Euler, --inference-steps);
  3. the T-curve: the parallel step (auto) and T Algorithm-1 steps at T = 1, 2, 5, 10, 20,
     40, the parallel-training claim as a curve (--t-curve: which dataset/precision pairs);
  4. the PyTorch per-block loop (`torch_reference.py`) on the same device and shapes,
     float32, when torch is importable (with CUDA, on a GPU).
Every timing is min / median / max over --rounds rounds of --repeats calls, each round
after a warm-up, each call waited for; the T-curve's two rows at each T take turns.
Memory: XLA's compiled memory analysis, and where the device reports its peak (GPU/TPU)
the peak of each training row alone: each runs in a fresh process, as that peak never
resets (the T-curve rows share one process per pair: XLA's analysis only).

Writes --out (JSON: the command, date, machine, library versions, settings and every row)
and --plot (the T-curve, PNG); `python experiments/render_results.py` renders the JSON
into the documentation's block for it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402  (a sibling module: the results file)
T_CURVE = (1, 2, 5, 10, 20, 40)
OUT, PLOT = Path("results/accelerator_benchmark.json"), Path("docs/img/accelerator_benchmark.png")
TRAIN_CASES = ("vmap", "unroll", "chunks1-scan", "auto", "algorithm1", "backprop", "backprop-remat")
TINY = dict(datasets=["mnist"], batch_size=8, T=2, t_curve_T=[1, 2], repeats=2,
            inference_steps=2, torch_fm_steps=2, torch_fm_batch=2)


# ----------------------------------------------------------------------------- one unit

def run_unit(unit: dict) -> list[dict]:
  """One unit of work in this process: a training row, the inference rows, or a T-curve
  pair's rows. Imports JAX here, so that the parent process never holds the device."""
  import benchmark  # noqa: E402  (a sibling script: its cases, timing and rows)
  import jax

  args = argparse.Namespace(dataset=unit["dataset"], batch_size=unit["batch_size"], T=unit["T"],
                            precision=unit["precision"], methods=[], repeats=unit["repeats"],
                            inference_steps=unit["inference_steps"])
  common = {k: unit[k] for k in ("dataset", "precision", "batch_size", "T")}
  backend = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
  if unit["what"] == "inference":
    return [{**r, **common, **backend} for r in benchmark.inference_rows(args)]
  if unit["what"] == "t_curve":
    rows = []
    for T in unit["Ts"]:
      specs = benchmark.cases(argparse.Namespace(**{**vars(args), "T": T}))
      # The pair takes turns (--rounds), so that their ratio is measured side by side.
      pair = benchmark.train_rows([(key, *specs[key][1:]) for key in ("auto", "algorithm1")],
                                  unit["repeats"], unit["rounds"])
      rows += [_train_fields(r, {**common, "T": T}, backend, T if r["kind"] == "algorithm1" else 1)
               for r in pair]
    return rows
  specs = benchmark.cases(args)
  label, kind, cfg = specs[unit["case"]]
  [r] = benchmark.train_rows([(unit["case"], kind, cfg)], unit["repeats"], unit["rounds"])
  return [_train_fields({**r, "name": label}, common, backend, unit["T"] if kind == "algorithm1" else 1)]


def _train_fields(r: dict, common: dict, backend: dict, per: int) -> dict:
  """A training row with its time per T block updates (Algorithm 1: `per` = T of its steps)."""
  out = {**r, **common, **backend}
  for q in ("min", "median", "max"):
    out[f"s_per_T_updates_{q}"] = per * r[f"s_{q}"]
  out["examples_per_s"] = common["batch_size"] / out["s_per_T_updates_median"]
  return out


# ----------------------------------------------------------------------------- orchestration

def _child(unit: dict) -> list[dict]:
  """`run_unit` in a fresh process; a failure (e.g. out of memory) becomes an error row."""
  p = subprocess.run([sys.executable, __file__, "--unit", json.dumps(unit)], capture_output=True,
                     text=True)
  rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
  if p.returncode or not rows:
    return [_error_row(unit, (p.stderr.strip().splitlines() or ["no output"])[-1])]
  return rows


def _error_row(unit: dict, error: str) -> dict:
  return {"table": unit["what"], "case": unit.get("case", unit["what"]), "error": error[:300],
          **{k: unit[k] for k in ("dataset", "precision", "T")}}


def _probe() -> dict:
  """The backend, the device, their count and whether the device reports a peak, from a
  child process (this one never holds the device)."""
  code = ("import json, jax; d = jax.devices()[0]; "
          "print(json.dumps({'backend': jax.default_backend(), 'device_kind': d.device_kind, "
          "'device_count': jax.device_count(), "
          "'reports_peak': 'peak_bytes_in_use' in (d.memory_stats() or {})}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def torch_rows(dataset: str, args, backend: str) -> list[dict]:
  """The PyTorch per-block loop on this machine's device (CUDA on a GPU backend, else the
  CPU), float32, timed in its own process; [] (with a note row) where torch is missing or
  has no CUDA on a GPU backend."""
  probe = ("import json, torch; print(json.dumps({'version': torch.__version__, "
           "'cuda': torch.cuda.is_available()}))")
  p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
  if p.returncode:
    return [{"table": "torch", "dataset": dataset, "skipped": "torch is not installed"}]
  info = json.loads(p.stdout.strip().splitlines()[-1])
  device = "cuda" if backend == "gpu" else "cpu"
  if device == "cuda" and not info["cuda"]:
    return [{"table": "torch", "dataset": dataset, "skipped": f"torch {info['version']} has no CUDA"}]
  from benchmark import SHAPES  # noqa: E402  (no JAX computation: shapes only)
  shape, m = SHAPES[dataset]
  if min(shape[:2]) < 14:  # the library pads them for the paper's block; the reference does not
    return [{"table": "torch", "dataset": dataset, "skipped": f"{dataset}'s images are too small "
             "for the PyTorch reference's unpadded block"}]
  spec = {"input_shape": shape, "num_classes": m, "batch_size": args.batch_size, "T": args.T,
          "fm_batch": args.torch_fm_batch, "fm_steps": args.torch_fm_steps,
          "threads": len(os.sched_getaffinity(0)), "device": device}
  child = subprocess.Popen([sys.executable, str(HERE / "torch_reference.py"), "--serve",
                            json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
  rows = []
  try:
    ready = json.loads(child.stdout.readline())
    for item in ("step", "block_step", "dt_predict", "fm_predict"):
      n = 1 if item == "fm_predict" else args.repeats
      child.stdin.write(f"{item} {n}\n")
      child.stdin.flush()
      times = json.loads(child.stdout.readline())
      rows.append({"table": "torch", "case": item, "dataset": dataset, "precision": "float32",
                   "T": args.T, "batch_size": args.batch_size, "torch": ready["torch"],
                   "torch_device": ready["device"], "s_min": min(times),
                   "s_median": statistics.median(times), "s_max": max(times), "timed_calls": n})
  finally:
    child.stdin.close()
    child.wait()
  return rows


def t_curve_plot(rows: list[dict], path: Path, machine: str) -> None:
  """ms per T block updates against T: the parallel step and T Algorithm-1 steps."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.4, 4.2))
  ax = fig.subplots()
  pairs = sorted({(r["dataset"], r["precision"]) for r in rows if "error" not in r})
  for (dataset, precision), color in zip(pairs, ("C0", "C1", "C2", "C3", "C4", "C5")):
    for case, style, label in (("auto", "-o", "parallel step"), ("algorithm1", "--s", "T x Algorithm 1")):
      pts = sorted((r["T"], 1e3 * r["s_per_T_updates_median"]) for r in rows
                   if "error" not in r and r["case"] == case and r["dataset"] == dataset
                   and r["precision"] == precision)
      if pts:
        ax.plot(*zip(*pts), style, color=color, label=f"{dataset} {precision}: {label}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  Ts = sorted({r["T"] for r in rows if "error" not in r})
  ax.set_xticks(Ts, [str(T) for T in Ts])
  ax.minorticks_off()
  ax.set_xlabel("T (blocks)")
  ax.set_ylabel("ms per T block updates (median)")
  ax.set_title(f"Training every block once on a batch: {machine}", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
  """The printed summary: one line per row, times in ms (min / median / max)."""
  out = []
  ms = lambda r, k="s": "/".join(f"{1e3 * r[f'{k}_{q}']:.2f}" for q in ("min", "median", "max"))
  for r in rows:
    where = f"{r.get('dataset', '')} {r.get('precision', '')} T={r.get('T', '')}"
    if "error" in r or "skipped" in r:
      out.append(f"{r['table']:9} {where:28} {r.get('case', ''):16} {r.get('error') or r['skipped']}")
      continue
    mem = ""
    if r.get("xla_peak_bytes"):
      mem = f" XLA peak {r['xla_peak_bytes'] / 2**20:.1f} MiB"
    if r.get("device_peak_bytes"):
      mem += f", device peak {r['device_peak_bytes'] / 2**20:.1f} MiB"
    if r["table"] == "train":
      out.append(f"train     {where:28} {r['case']:16} {r['resolved']:18} ms per T updates "
                 f"{ms(r, 's_per_T_updates')}{mem}")
    elif r["table"] == "inference":
      out.append(f"inference {where:28} {r['case']:16} ms per batch {ms(r)}")
    elif r["table"] == "torch":
      out.append(f"torch     {where:28} {r['case']:16} ms {ms(r)} ({r['torch_device']})")
    elif r["table"] == "auto":
      out.append(f"auto      {where:28} picked {r['picked']}, fastest {r['fastest']} "
                 f"({r['auto_over_fastest']:.2f}x): {'within' if r['within'] else 'NOT within'} "
                 f"{r['tolerance']:.0%}")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
  p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                 choices=["float32", "bfloat16"])
  p.add_argument("--batch-size", type=int, default=128, help="paper: 128")
  p.add_argument("--T", type=int, default=10, help="blocks of the training rows (paper: 10)")
  p.add_argument("--t-curve-T", type=int, nargs="+", default=list(T_CURVE))
  p.add_argument("--t-curve", nargs="*", default=None, metavar="DATASET:PRECISION",
                 help="pairs for the T-curve (default: every dataset in float32, and the "
                 "first in bfloat16); none: skip it")
  p.add_argument("--repeats", type=int, default=10, help="timed calls per round (Algorithm 1: x T)")
  p.add_argument("--rounds", type=int, default=2, help="rounds of --repeats calls per training row")
  p.add_argument("--inference-steps", type=int, default=100, help="FM Euler steps (paper: 1000)")
  p.add_argument("--torch-fm-steps", type=int, default=100, help="PyTorch FM: Euler steps")
  p.add_argument("--torch-fm-batch", type=int, default=16)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--tiny", action="store_true", help="tiny sizes on any backend (the tests): "
                 + ", ".join(f"{k}={v}" for k, v in TINY.items()))
  p.add_argument("--out", type=Path, default=OUT)
  p.add_argument("--plot", type=Path, default=None, help=f"default: {PLOT} (the documentation "
                 "shows it) with the default --out, else --out with .png")
  p.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # child: one unit
  args = p.parse_args(argv)
  if args.unit:
    for row in run_unit(json.loads(args.unit)):
      print(json.dumps(row))
    return 0
  if args.tiny:
    for k, v in TINY.items():
      setattr(args, k, v)
  t_curve = ([f"{d}:float32" for d in args.datasets] + [f"{args.datasets[0]}:bfloat16"]
             if args.t_curve is None else args.t_curve)
  for pair in t_curve:
    if pair.count(":") != 1 or pair.split(":")[1] not in ("float32", "bfloat16"):
      p.error(f"--t-curve takes DATASET:PRECISION pairs (precision float32 or bfloat16), got {pair!r}")

  start = time.time()
  info = _probe()
  isolate = info["reports_peak"]  # the device's peak is per process: one process per row
  run = _child if isolate else _in_process
  base = dict(batch_size=args.batch_size, T=args.T, repeats=args.repeats, rounds=args.rounds,
              inference_steps=args.inference_steps)
  rows, seconds = [], {}
  import benchmark  # noqa: E402

  for dataset in args.datasets:
    for precision in args.precisions:
      t0 = time.time()
      unit = dict(base, dataset=dataset, precision=precision)
      group = []
      for case in TRAIN_CASES:
        group += run(dict(unit, what="train", case=case))
      check = benchmark.auto_check(group)
      group += [dict(check, dataset=dataset, precision=precision, T=args.T)] if check else []
      group += run(dict(unit, what="inference"))
      rows += group
      seconds[f"{dataset}/{precision}"] = time.time() - t0
      print(table(group), flush=True)
  for pair in t_curve:
    dataset, precision = pair.split(":")
    t0 = time.time()
    # One process for the pair's rows (XLA's memory analysis only): fresh ones would
    # multiply the run's length by the process start-up.
    group = _child(dict(base, dataset=dataset, precision=precision, what="t_curve",
                        Ts=args.t_curve_T, T=max(args.t_curve_T)))
    for r in group:
      r["table"] = "t_curve" if "error" not in r else r["table"]
    rows += group
    seconds[f"t_curve {pair}"] = time.time() - t0
    print(table([dict(r, table="train") if r["table"] == "t_curve" else r for r in group]), flush=True)
  if not args.no_torch:
    for dataset in args.datasets:
      t0 = time.time()
      group = torch_rows(dataset, args, info["backend"])
      rows += group
      seconds[f"torch {dataset}"] = time.time() - t0
      print(table(group), flush=True)

  seconds["total"] = time.time() - start
  results.write(args.out, __file__, argv, rows,
                {k: v for k, v in vars(args).items() if k != "unit"} | {"t_curve": t_curve},
                info["backend"], info["device_kind"], device_count=info["device_count"],
                seconds=seconds)
  machine = results.machine(info["backend"], info["device_kind"])["summary"]
  plot = args.plot or (PLOT if args.out == OUT else args.out.with_suffix(".png"))
  t_rows = [r for r in rows if r["table"] == "t_curve"]
  if t_rows:
    t_curve_plot(t_rows, plot, machine)
  print(f"\n{len(rows)} rows in {seconds['total']:.0f} s on {machine}: {args.out}"
        + (f", the T-curve in {plot}" if t_rows else ""))
  return 0


def _in_process(unit: dict) -> list[dict]:
  """`run_unit` here (a device that reports no peak: nothing to isolate); a failure
  becomes an error row, as in a child."""
  try:
    return run_unit(unit)
  except Exception as e:  # noqa: BLE001  (a row that fails does not end the benchmark)
    return [_error_row(unit, f"{type(e).__name__}: {e}")]


if __name__ == "__main__":
  from noprop_jax import host_memory
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
