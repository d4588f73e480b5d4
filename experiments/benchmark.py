"""One NoProp-DT training step in every formulation, side by side, and inference.

  python experiments/benchmark.py                          # MNIST shapes, batch 128, T = 10
  python experiments/benchmark.py --dataset cifar10 --json # + one JSON line per row
  python experiments/benchmark.py --cases vmap unroll scan algorithm1 backprop chunks
  python experiments/benchmark.py --precision bfloat16 --skip-inference

Training rows (random data of the dataset's shape, the paper's architecture):
all T blocks vmapped or unrolled in one step; chunks of k blocks (vmapped or
unrolled) scanned over the T / k chunks of the step, for every proper divisor k
of T (k = 1: a scan); one block per step (the paper's Algorithm 1); the
back-propagation baseline; and the auto default (the row it resolves to).
Case keys for --cases (a key or its prefix): vmap, unroll, chunks<k>-vmap,
chunks<k>-unroll, chunks1-scan (alias scan), algorithm1, backprop, backprop-remat
(back-propagation with each block rematerialised), auto; 'chunks' selects every chunk
row, 'backprop' both back-propagation rows. With auto and other parallel rows, a line
says which formulation auto picked, which row was fastest, and whether auto is within
10% of it (the rule `auto` must meet on every backend).

Each step is compiled ahead of time (compile s = lower + compile), then the
compiled steps are timed in --rounds rounds, the rows taking turns, so that a shared
machine's drifting speed moves every row alike: each round, one warm-up step and then
--repeats steps (Algorithm 1: --repeats x T), each waited for; ms/step is the median
over all rounds. Memory is XLA's compiled memory analysis. Where the device reports
its peak (GPU/TPU), that peak never resets, so every row runs all its rounds in a
fresh process of its own (the backend is found by a first child process, so this
process never holds the device). FLOPs are XLA's cost analysis of the step with
dropout off (its mask's integer hashing is no floating-point work), against a
matmul peak measured at the start.

--methods NAME ... adds one row per registered method: its own training step (all its
blocks, default settings but T), e.g. to compare a method of your own
(--method-module MODULE registers it) with NoProp-DT's rows on the same shapes.

Inference rows: NoProp-DT (auto formulation, mean path) and NoProp-CT/FM
(Euler, mean path) at --inference-steps solver steps (default 100; the paper
uses 1000), on a batch of --batch-size images.

Against PyTorch (on XLA:CPU, when torch is importable; --no-torch skips it): the
per-block loop of `torch_reference.py` (T blocks, one AdamW each, as public PyTorch
code trains) on the same shapes and as many threads as XLA uses, in a child process
with glibc's default malloc (a PyTorch user's process; this one has `noprop_jax`'s
settings), timed alternately with the library's default step, its Algorithm 1 step and
its inference, over --rounds rounds; the table gives each median and the ratios.
DT inference is a batch through the T blocks; FM's is --torch-fm-steps (default
1000, the paper's) Euler steps on --torch-fm-batch images, the PyTorch block called
whole at every step.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import results
from noprop_jax import cli, core, dt, host_memory, trainer
from noprop_jax import method as methods
from noprop_jax.config import RunConfig, method_settings

ALIASES = {"scan": "chunks1-scan", "alg1": "algorithm1"}
MiB = 2**20
# (input shape, number of classes) of the named datasets: the rows run on random data.
SHAPES = {"digits": ((8, 8, 1), 10), "mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
          "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
          "tiny_imagenet": ((64, 64, 3), 200)}


# ----------------------------------------------------------------------------- cases

def cases(args) -> dict[str, tuple[str, str, RunConfig]]:
  """key -> (label, kind, config); kind is 'parallel', 'algorithm1', 'backprop' or
  'method' (a registered method's own step, --methods)."""
  T = args.T
  base = dict(dataset=args.dataset, batch_size=args.batch_size, T=T)
  dt_cfg = lambda **kw: RunConfig.create("dt", **base, precision=args.precision, **kw)
  out = {"vmap": (f"vmap (all {T} blocks)", "parallel", dt_cfg(formulation="vmap")),
         "unroll": (f"unroll (all {T} blocks)", "parallel", dt_cfg(formulation="unroll"))}
  for k in (k for k in range(T - 1, 1, -1) if T % k == 0):
    for form in ("vmap", "unroll"):
      out[f"chunks{k}-{form}"] = (f"chunks of {k} ({form})", "parallel",
                                  dt_cfg(formulation=form, blocks_per_step=k))
  if T > 1:
    out["chunks1-scan"] = ("chunks of 1 (scan)", "parallel", dt_cfg(formulation="scan"))
  out["algorithm1"] = ("one block per step (Algorithm 1)", "algorithm1", dt_cfg(training="sequential"))
  bp_label = "backprop" + (" (float32)" if args.precision != "float32" else "")
  out["backprop"] = (bp_label, "backprop", RunConfig.create("backprop", **base))
  # The fair baseline for memory: each block's activations recomputed in the backward pass,
  # on a lax.scan chain (XLA:CPU schedules an unrolled one no lower; on GPU/TPU the chain
  # is a scan anyway).
  out["backprop-remat"] = (bp_label.replace("backprop", "backprop, remat per block"), "backprop",
                           RunConfig.create("backprop", remat=True, formulation="scan", **base))
  for name in args.methods:
    m = methods.get(name)
    own = {"T": T} if "T" in method_settings(name) else {}
    out[f"method-{name}"] = (f"{m.title} (its step)", "method", RunConfig.create(
        name, dataset=args.dataset, batch_size=args.batch_size, **own))
  out["auto"] = ("auto", "parallel", dt_cfg())
  return out


def select(keys: list[str], wanted: list[str] | None) -> list[str]:
  """The keys matching any of `wanted` (keys, aliases or prefixes), in table order."""
  if not wanted:
    return list(keys)
  wanted = [ALIASES.get(w, w) for w in wanted]
  unknown = [w for w in wanted if not any(k.startswith(w) for k in keys)]
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; choose from {list(keys)} (or a prefix, or scan)")
  return [k for k in keys if any(k.startswith(w) for w in wanted)]


def build(cfg: RunConfig):
  """(resolved compute, model with the paper's block) for the dataset's shapes."""
  shape, m = SHAPES[cfg.data.dataset]
  compute = trainer.resolve_compute(cfg)
  return compute, trainer.build_model(cfg, shape, m, compute)


def resolved(kind: str, cfg: RunConfig) -> str:
  """What the auto settings resolve to: formulation/blocks per step/conv impl (backprop:
  'chain-unroll' or 'chain-scan', its blocks folded one after another: unrolled on
  XLA:CPU by default, else a scan)."""
  compute, model = build(cfg)
  k = 1 if kind == "algorithm1" else compute.blocks_per_step
  form = (f"chain-{'unroll' if compute.formulation == 'unroll' else 'scan'}" if kind == "backprop"
          else compute.formulation)
  return f"{form}/{k}/{getattr(model.block, 'conv_impl', 'n/a')}"


def data(cfg: RunConfig):
  """Random uint8 images and labels of the dataset's shape."""
  shape, m = SHAPES[cfg.data.dataset]
  rng = np.random.RandomState(0)
  x = rng.randint(0, 256, (cfg.train.batch_size, *shape), dtype=np.uint8)
  y = rng.randint(0, m, (cfg.train.batch_size,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


# ----------------------------------------------------------------------------- measurements

def timings(fn, state, *args, n: int) -> tuple[list[float], object]:
  """(seconds of each call, final state) of `fn(state, *args) -> (state, out)`: one
  warm-up call, then n calls, each waited for."""
  state, out = jax.block_until_ready(fn(state, *args))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state, out = jax.block_until_ready(fn(state, *args))
    times.append(time.perf_counter() - t0)
  return times, state


def timed(fn, state, *args, n: int) -> tuple[float, object]:
  """(median seconds per call, final state): `timings`' median."""
  times, state = timings(fn, state, *args, n=n)
  return statistics.median(times), state


def spread(times: list[float]) -> dict:
  """min / median / max seconds of the timed calls."""
  return {"s_min": min(times), "s_median": statistics.median(times), "s_max": max(times)}


def xla_memory(compiled) -> tuple[int | None, int | None]:
  """(temp, peak = arguments + outputs - aliased + temp: `core.peak_bytes`) bytes, or Nones."""
  m = compiled.memory_analysis()
  if m is None:
    return None, None
  return m.temp_size_in_bytes, core.peak_bytes(compiled)


def xla_flops(compiled) -> float | None:
  """FLOPs of one call by XLA's cost analysis (a loop body counts once)."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else None
  f = (c or {}).get("flops")
  return float(f) if f and f > 0 else None


def arithmetic_flops(kind: str, cfg: RunConfig) -> float | None:
  """The step's floating-point work: XLA's cost analysis of the step as lowered (before
  compilation) with dropout off. With dropout on, its mask's integer hashing (20 rounds of
  threefry per element, fused into the step) would count as FLOPs and inflate the share
  of the matmul peak."""
  cfg = dataclasses.replace(cfg, block=dataclasses.replace(cfg.block, dropout=0.0))
  x, y = data(cfg)
  state = jax.eval_shape(lambda: init_state(cfg))
  return xla_flops(jitted_step(kind, cfg).lower(state, x, y))


def device_peak() -> int | None:
  """Peak device bytes in use by this process (GPU/TPU), else None."""
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return int(peak) if peak else None


def probe(args, specs) -> dict:
  """The backend, whether it reports a device peak, each case's resolved settings,
  and the matmul peak: an n x n jitted `a @ b` timed like the steps."""
  backend = jax.default_backend()
  n = args.matmul_size or (2048 if backend == "cpu" else 4096)
  dtype = jnp.bfloat16 if args.precision == "bfloat16" else jnp.float32
  ka, kb = jax.random.split(jax.random.key(1))
  a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  t, _ = timed(lambda s, a, b: (s, mm(a, b)), None, a, b, n=args.repeats)
  return {"table": "probe", "backend": backend, "device_kind": jax.devices()[0].device_kind,
          "has_device_peak": bool((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")),
          "matmul_size": n, "matmul_dtype": jnp.dtype(dtype).name, "matmul_s": t,
          "matmul_flops_per_s": 2 * n**3 / t,
          "resolved": {key: resolved(kind, cfg) for key, (_, kind, cfg) in specs.items()}}


def init_state(cfg: RunConfig):
  """The initial state. It does not depend on the formulation (nor on the convolution it
  picks): one model of the auto settings (one compiled init) serves every row."""
  auto = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, formulation="auto", blocks_per_step=0, training="parallel"))
  return trainer.init_state(auto, build(auto)[1], jax.random.key(0))


def jitted_step(kind: str, cfg: RunConfig):
  """The case's jitted training step `(state, x, y) -> (state, metrics)`, state donated:
  the method's own (not the wrapper that checks each batch), or for Algorithm 1 the
  step of block step % T."""
  compute, model = build(cfg)
  optim, T = cfg.train.optim, cfg.T
  if kind == "algorithm1":
    return jax.jit(lambda s, x, y: dt.sequential_step(model, optim, compute, s, x, y, s["step"] % T),
                   donate_argnums=0)
  return jax.jit(lambda s, x, y: cfg.method_record.train_step(model, optim, compute, s, x, y),
                 donate_argnums=0)


def prepare_row(key: str, kind: str, cfg: RunConfig):
  """Compile one training step: (its row without timings, `time(n)` -> the seconds of n
  more steps after a warm-up, each waited for, the row's state carried from call to call)."""
  x, y = data(cfg)
  compute, T = build(cfg)[0], cfg.T
  state = init_state(cfg)
  step = jitted_step(kind, cfg)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  compiled = step.lower(state, x, y).compile()
  compile_s = time.perf_counter() - t0
  temp, peak = xla_memory(compiled)
  # Loops that hold block work (XLA counts their body once): chunks of k < T blocks,
  # and backprop's chain of blocks, a lax.scan unless unrolled (XLA:CPU).
  looped = ((kind == "parallel" and compute.blocks_per_step < T)
            or (kind == "backprop" and compute.formulation != "unroll")
            or (kind == "method" and (compute.formulation == "scan" or compute.blocks_per_step < T)))
  row = {"table": "train", "case": key, "kind": kind, "resolved": resolved(kind, cfg),
         "compile_s": compile_s, "xla_temp_bytes": temp, "xla_peak_bytes": peak,
         "flops_xla": arithmetic_flops(kind, cfg), "looped": looped}

  def time_steps(n: int) -> list[float]:
    nonlocal state
    times, state = timings(compiled, state, x, y, n=n)
    return times

  return row, time_steps


def train_rows(specs: list[tuple[str, str, RunConfig]], repeats: int, rounds: int) -> list[dict]:
  """Compile every (key, kind, config) step, then time them in `rounds` alternating rounds
  of `repeats` steps each (Algorithm 1: x T): on a shared machine whose speed drifts, the
  rows' ratios are then measured side by side. Raw numbers (derived ones come later)."""
  prepared = [prepare_row(*spec) for spec in specs]
  times = [[] for _ in prepared]
  # Algorithm 1 times T of its steps per repeat: every block then trains on the batch once.
  steps = [repeats * (cfg.T if kind == "algorithm1" else 1) for _, kind, cfg in specs]
  for _ in range(rounds):
    for (_, time_steps), ts, n in zip(prepared, times, steps):
      ts += time_steps(n)
  return [{**row, "s_per_step": statistics.median(ts), "timed_steps": len(ts), "rounds": rounds,
           "device_peak_bytes": device_peak(), **spread(ts)}
          for (row, _), ts in zip(prepared, times)]


def inference_rows(args) -> list[dict]:
  """NoProp-DT (auto, mean path) and NoProp-CT/FM (Euler, mean path) inference."""
  base = dict(dataset=args.dataset, batch_size=args.batch_size, precision=args.precision)
  dt_cfg = RunConfig.create("dt", **base, T=args.T)
  compute, model = build(dt_cfg)
  runs = [("dt", f"NoProp-DT ({compute.formulation}/{getattr(model.block, 'conv_impl', 'n/a')})",
           lambda s, x, model=model, compute=compute: dt.predict(model, s, x, compute=compute),
           dt_cfg, trainer.init_state(dt_cfg, model, jax.random.key(0)), dt_cfg.T)]
  for m in ("ct", "fm"):
    c = RunConfig.create(m, inference_steps=args.inference_steps, **base)
    model = build(c)[1]
    runs.append((m, f"NoProp-{m.upper()} (Euler)",
                 lambda s, x, model=model, mod=methods.get(m): mod.predict(model, s, x),
                 c, trainer.init_state(c, model, jax.random.key(0)), model.inference_steps))
  rows = []
  for key, label, predict, cfg, state, steps in runs:
    x, _ = data(cfg)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    compiled = jax.jit(predict).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    times, _ = timings(lambda st, x: (st, compiled(st, x)), state, x, n=args.repeats)
    s = statistics.median(times)
    rows.append({"table": "inference", "case": key, "name": label, "solver_steps": steps, **spread(times),
                 "compile_s": compile_s, "s_per_batch": s, "ms_per_batch": 1e3 * s,
                 "examples_per_s": args.batch_size / s, "ms_per_solver_step": 1e3 * s / steps,
                 "batch_size": args.batch_size})
  return rows


def torch_rows(args, specs) -> list[dict]:
  """The library against the PyTorch per-block loop, timed alternately: per item, the
  median over `args.rounds` rounds of `args.repeats` calls each (block steps: x T), each
  side's calls after one untimed call. PyTorch runs in a child process of its own
  (`torch_reference.serve`): this process has `noprop_jax`'s malloc settings, a PyTorch
  user's has glibc's defaults."""
  threads = len(os.sched_getaffinity(0))  # XLA:CPU's thread pool has one thread per core
  shape, m = SHAPES[args.dataset]
  T = args.T
  spec = {"input_shape": shape, "num_classes": m, "batch_size": args.batch_size, "T": T,
          "fm_batch": args.torch_fm_batch, "fm_steps": args.torch_fm_steps, "threads": threads}
  child = subprocess.Popen(
      [sys.executable, str(Path(__file__).with_name("torch_reference.py")), "--serve",
       json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
      env={**os.environ, host_memory.ENV: "0"})

  def theirs(item, n):
    child.stdin.write(f"{item} {n}\n")
    child.stdin.flush()
    return json.loads(child.stdout.readline())

  ours = {}
  for key, item in (("auto", "step"), ("algorithm1", "block_step")):
    _, kind, cfg = specs[key]
    x, y = data(cfg)
    state = init_state(cfg)
    compiled = jitted_step(kind, cfg).lower(state, x, y).compile()
    ours[item] = [compiled, state, (x, y), arithmetic_flops(kind, cfg), resolved(kind, cfg)]
  dt_cfg = RunConfig.create("dt", dataset=args.dataset, batch_size=args.batch_size, T=T)
  compute, model = build(dt_cfg)
  x, _ = data(dt_cfg)
  dt_state = init_state(dt_cfg)
  pred = jax.jit(lambda s, x: dt.predict(model, s, x, compute=compute)).lower(dt_state, x).compile()
  ours["dt_predict"] = [lambda s, x: (s, pred(s, x)), dt_state, (x,), xla_flops(pred), ""]
  fm_cfg = RunConfig.create("fm", dataset=args.dataset, batch_size=args.torch_fm_batch,
                            inference_steps=args.torch_fm_steps)
  fm_model = build(fm_cfg)[1]
  x, _ = data(fm_cfg)
  fm_state = trainer.init_state(fm_cfg, fm_model, jax.random.key(0))
  fm_pred = jax.jit(lambda s, x: methods.get("fm").predict(fm_model, s, x)).lower(fm_state, x).compile()
  ours["fm_predict"] = [lambda s, x: (s, fm_pred(s, x)), fm_state, (x,), xla_flops(fm_pred), ""]

  def ours_timed(item, n):
    fn, _, inputs = ours[item][:3]
    times = []
    for _ in range(n + 1):  # the first call untimed, as the child's
      t0 = time.perf_counter()
      ours[item][1], _ = jax.block_until_ready(fn(ours[item][1], *inputs))
      times.append(time.perf_counter() - t0)
    return times[1:]

  try:
    torch_version = json.loads(child.stdout.readline())["torch"]
    times = {(side, item): [] for item in ours for side in ("jax", "torch")}
    for _ in range(args.rounds):
      for item in ours:
        n = 1 if item == "fm_predict" else args.repeats * (T if item == "block_step" else 1)
        times["jax", item] += ours_timed(item, n)
        times["torch", item] += theirs(item, n)
  finally:
    child.stdin.close()
    child.wait()
  rows = []
  for item in ours:
    j, t = (statistics.median(times[side, item]) for side in ("jax", "torch"))
    rows.append({"table": "torch", "case": item, "resolved": ours[item][4], "jax_s": j,
                 "torch_s": t, "speedup": t / j, **{f"{side}_s_{q}": f(times[side, item])
                 for side in ("jax", "torch") for q, f in (("min", min), ("max", max))}, "flops_jax": ours[item][3], "threads": threads,
                 "torch_version": torch_version, "timed_calls": len(times["jax", item]),
                 "host_memory": host_memory.status})
  return rows


def run_unit(unit: str, args, specs) -> list[dict]:
  """One unit of work in this process: 'probe', 'inference', 'torch' or a training case key."""
  if unit == "probe":
    return [probe(args, specs)]
  if unit == "inference":
    return inference_rows(args)
  if unit == "torch":
    return torch_rows(args, specs)
  return train_rows([(unit, *specs[unit][1:])], args.repeats, args.rounds)


def run_child(unit: str, args) -> list[dict]:
  """`run_unit` in a fresh process (its device peak alone); a failure becomes an error row."""
  cmd = [sys.executable, str(Path(__file__).resolve()), "--case", unit, "--dataset", args.dataset,
         "--batch-size", str(args.batch_size), "--T", str(args.T), "--repeats", str(args.repeats),
         "--precision", args.precision, "--inference-steps", str(args.inference_steps),
         "--rounds", str(args.rounds), "--torch-fm-batch", str(args.torch_fm_batch),
         "--torch-fm-steps", str(args.torch_fm_steps), "--methods", *args.methods]
  for module in args.method_module:
    cmd += ["--method-module", module]
  if args.matmul_size:
    cmd += ["--matmul-size", str(args.matmul_size)]
  p = subprocess.run(cmd, capture_output=True, text=True)
  rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
  if p.returncode or not rows:
    err = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
    if unit == "probe":
      raise RuntimeError(f"the probe process failed: {p.stderr[-2000:]}")
    return [{"table": unit if unit in ("inference", "torch") else "train", "case": unit, "error": err}]
  return rows


# ----------------------------------------------------------------------------- derived numbers

def derive(rows: list[dict], specs, info: dict, args) -> None:
  """Per-row examples/s, ratios and FLOP rates, in place."""
  T, batch, peak = args.T, args.batch_size, info["matmul_flops_per_s"]
  ok = {r["case"]: r for r in rows if "error" not in r}
  # Every NoProp-DT parallel step does the same arithmetic: a chunked one's FLOPs
  # are those of the loop-free step of all T blocks.
  ref = next((ok[k]["flops_xla"] for k in ("vmap", "unroll") if k in ok), None)
  for r in rows:
    r.update(name=r.get("name") or specs[r["case"]][0], dataset=args.dataset, batch_size=batch,
             T=T, precision=args.precision, backend=info["backend"], device_kind=info["device_kind"],
             matmul_peak_flops_per_s=peak)
    if "error" in r:
      continue
    s = r["s_per_step"]
    passes = T if r["kind"] == "algorithm1" else 1  # steps for every block to see the batch once
    r.update(ms_per_step=1e3 * s, steps_per_s=1 / s, examples_per_s=batch / (passes * s))
    if r["kind"] == "algorithm1":
      r.update(s_per_T_steps=T * s, ms_per_T_steps=1e3 * T * s)
    if r["looped"]:
      r["flops"], r["flops_source"] = ((ref, "loop-free step of all T blocks") if r["kind"] == "parallel"
                                       else (r["flops_xla"], "lower bound: a loop body counted once"))
    else:
      r["flops"], r["flops_source"] = r["flops_xla"], "xla"
    f = r["flops"]
    r["flops_per_s"] = f / s if f else None
    r["frac_matmul_peak"] = f / s / peak if f else None
    to_mib = lambda b: b / MiB if b is not None else None
    r.update(xla_temp_mib=to_mib(r["xla_temp_bytes"]), xla_peak_mib=to_mib(r["xla_peak_bytes"]),
             device_peak_mib=to_mib(r["device_peak_bytes"]))
  alg1, vmap = ok.get("algorithm1"), ok.get("vmap")
  for r in ok.values():
    r["x_algorithm1"] = r["examples_per_s"] / alg1["examples_per_s"] if alg1 else None
    r["temp_x_vmap"] = (r["xla_temp_bytes"] / vmap["xla_temp_bytes"]
                        if vmap and vmap["xla_temp_bytes"] and r["xla_temp_bytes"] is not None else None)


# ----------------------------------------------------------------------------- table

AUTO_TOLERANCE = 0.10  # auto's step may take at most this much longer than the fastest row's


def auto_check(rows: list[dict]) -> dict | None:
  """The configuration auto picked against the fastest configuration measured (a row that
  failed, e.g. out of memory, does not count): {'picked', 'fastest' (a case of it),
  'fastest_resolved', the ratio of their step times 'auto_over_fastest' (>= 1), 'within'};
  None without auto and another parallel row. Rows are compared by the configuration they
  resolve to: where auto's was measured by two rows (in processes of their own, as on a
  GPU), it is one program, whose faster measurement counts, so that the noise between two
  timings of the same program never reads as a wrong pick."""
  par = [r for r in rows if r.get("kind") == "parallel" and "error" not in r]
  auto = next((r for r in par if r["case"] == "auto"), None)
  if auto is None or len(par) < 2:
    return None
  best = {}  # resolved configuration -> its fastest row (on a tie, a named case before auto)
  for r in sorted(par, key=lambda r: (r["s_per_step"], r["case"] == "auto")):
    best.setdefault(r["resolved"], r)
  fastest = min(best.values(), key=lambda r: r["s_per_step"])
  ratio = best[auto["resolved"]]["s_per_step"] / fastest["s_per_step"]
  return {"table": "auto", "picked": auto["resolved"], "fastest": fastest["case"],
          "fastest_resolved": fastest["resolved"], "auto_over_fastest": ratio,
          "within": ratio <= 1 + AUTO_TOLERANCE, "tolerance": AUTO_TOLERANCE}


def auto_line(check: dict) -> str:
  return (f"auto picked {check['picked']}; the fastest row was {check['fastest']} "
          f"({check['fastest_resolved']}); auto's step took {check['auto_over_fastest']:.2f}x "
          f"its time: {'within' if check['within'] else 'NOT within'} "
          f"{check['tolerance']:.0%} of the fastest")


def fmt(v, spec: str, width: int, na: str = "n/a") -> str:
  return f"{na:>{width}}" if v is None else f"{v:>{width}{spec}}"


def train_table(rows: list[dict], info: dict, args) -> str:
  cols = (f"{'case':34} {'resolved':17} {'compile s':>9} {'ms/step':>9} {'examples/s':>10} "
          f"{'x Alg. 1':>8} {'temp MiB':>9} {'x vmap':>6} {'peak MiB':>9} {'dev. MiB':>9} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'% matmul':>8}")
  out = [f"NoProp-DT training step: backend {info['backend']} ({info['device_kind']}), "
         f"{args.dataset} shapes, batch {args.batch_size}, T={args.T}, {args.precision}, "
         f"matmul peak {info['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
         f"({info['matmul_size']}^2 {info['matmul_dtype']})", cols, "-" * len(cols)]
  for r in rows:
    if "error" in r:
      out.append(f"{r['name']:34} failed: {r['error']}")
      continue
    g = lambda f: f / 1e9 if f else None
    mark = {"xla": " ", "loop-free step of all T blocks": "*"}.get(r["flops_source"], ">")
    pct = 100 * r["frac_matmul_peak"] if r["frac_matmul_peak"] else None
    line = lambda name, ms, comp, flops: (
        f"{name:34} {r['resolved']:17} {comp} {ms:9.1f} {r['examples_per_s']:10.1f} "
        f"{fmt(r['x_algorithm1'], '.2f', 8)} {fmt(r['xla_temp_mib'], '.1f', 9)} "
        f"{fmt(r['temp_x_vmap'], '.2f', 6)} {fmt(r['xla_peak_mib'], '.1f', 9)} "
        f"{fmt(r['device_peak_mib'], '.1f', 9)} {fmt(g(flops), '.2f', 9)}{mark if flops else ' '} "
        f"{fmt(g(r['flops_per_s']), '.1f', 8)} {fmt(pct, '.1f', 8)}")
    out.append(line(r["name"], r["ms_per_step"], f"{r['compile_s']:9.1f}", r["flops"]))
    if r["kind"] == "algorithm1":
      out.append(line(f"  x T = {args.T} steps (T block updates)", r["ms_per_T_steps"], f"{'':9}",
                      r["flops"] and args.T * r["flops"]))
  out += [
      f"ms/step: median of {args.rounds} rounds x --repeats ({args.repeats}) steps, each waited "
      f"for, after a warm-up per round (Algorithm 1: {args.repeats} x T steps a round), the rows "
      "taking turns round by round; compile s: lower + compile.",
      "examples/s: batch / time for every block to train on the batch once: batch / t_step, "
      "and batch / (T t_step) for Algorithm 1 (T of its steps = one parallel step's block updates).",
      "x Alg. 1: examples/s over Algorithm 1's. temp, peak: XLA's memory analysis (peak = arguments "
      "+ outputs - aliased + temp); x vmap: temp over vmap's; dev.: the device's peak_bytes_in_use, "
      "one process per row (n/a: not reported, e.g. CPU).",
      "GFLOP/step: XLA's cost analysis of the step with dropout off; * a step with a loop over chunks, whose body XLA counts once: "
      "the loop-free all-T step's FLOPs (the same arithmetic); > a lower bound (loop body once). "
      "% matmul: GFLOP/s over the matmul peak."]
  return "\n".join(out)


def inference_table(rows: list[dict], args) -> str:
  cols = (f"{'inference (mean path)':34} {'solver steps':>12} {'compile s':>9} {'ms/batch':>9} "
          f"{'examples/s':>10} {'ms/solver step':>14}")
  out = [f"Inference on a batch of {args.batch_size}: DT's T denoising steps (after the T image "
         f"pathways); CT/FM: {args.inference_steps} Euler steps (the paper uses 1000), image term "
         "computed once", cols, "-" * len(cols)]
  for r in rows:
    if "error" in r:
      out.append(f"{r['case']:34} failed: {r['error']}")
      continue
    out.append(f"{r['name']:34} {r['solver_steps']:12d} {r['compile_s']:9.1f} "
               f"{r['ms_per_batch']:9.1f} {r['examples_per_s']:10.1f} {r['ms_per_solver_step']:14.3f}")
  out.append("ms/batch: median of --repeats calls after a warm-up; ms/solver step: ms/batch over "
             "the solver steps.")
  return "\n".join(out)


TORCH_ITEMS = {
    "step": ("training: one step of all T blocks", "the default parallel step",
             "T block steps in a Python loop (each AdamW), + head"),
    "block_step": ("training: one block's step", "Algorithm 1's step", "one block's step + head"),
    "dt_predict": ("NoProp-DT inference, one batch", "dt.predict (mean path)",
                   "T whole blocks in a loop"),
    "fm_predict": ("NoProp-FM inference, one batch", "fm.predict (Euler)",
                   "the whole block at every Euler step")}


def torch_table(rows: list[dict], info: dict, args) -> str:
  peak = info["matmul_flops_per_s"]
  r0 = next((r for r in rows if "error" not in r), {})  # a failed child gives one error row
  cols = (f"{'':36} {'noprop_jax ms':>13} {'PyTorch ms':>10} {'speed-up':>8} "
          f"{'examples/s jax / torch':>22} {'% matmul jax / torch':>20}")
  out = [f"Against PyTorch {r0.get('torch_version', '')} (CPU, {r0.get('threads', '?')} threads, "
         f"its own process; noprop_jax's host memory: {r0.get('host_memory', '?')}), timed alternately "
         f"in {args.rounds} rounds: {args.dataset} shapes, batch {args.batch_size}, T={args.T}; "
         f"FM: {args.torch_fm_steps} Euler steps on {args.torch_fm_batch} images", cols,
         "-" * len(cols)]
  for r in rows:
    if "error" in r:
      out.append(f"{r['case']:36} failed: {r['error']}")
      continue
    n = args.torch_fm_batch if r["case"] == "fm_predict" else args.batch_size
    training = r["case"] in ("step", "block_step")
    # The PyTorch loop does the same arithmetic as the training steps; its inference does
    # more (whole blocks), so only the training rows get a matmul-peak fraction.
    pct = (f"{100 * r['flops_jax'] / r['jax_s'] / peak:9.1f} / {100 * r['flops_jax'] / r['torch_s'] / peak:<8.1f}"
           if training and r["flops_jax"] else f"{'n/a':>20}")
    per = args.T if r["case"] == "block_step" else 1  # every block trains on the batch once
    out.append(f"{TORCH_ITEMS[r['case']][0]:36} {1e3 * r['jax_s']:13.1f} {1e3 * r['torch_s']:10.1f} "
               f"{r['speedup']:7.2f}x {n / per / r['jax_s']:11.1f} / {n / per / r['torch_s']:<8.1f} "
               f"{pct}")
  out += ["noprop_jax: " + "; ".join(f"{v[0].split(':')[-1].strip()}: {v[1]}" for v in TORCH_ITEMS.values()),
          "PyTorch (experiments/torch_reference.py): " + "; ".join(
              f"{v[0].split(':')[-1].strip()}: {v[2]}" for v in TORCH_ITEMS.values()),
          "speed-up: PyTorch's median time over noprop_jax's (> 1: noprop_jax is faster). examples/s: "
          "for training, per example seen by every block (a block step: x T).",
          "% matmul: XLA's FLOP count of the library's step over the time, against the matmul peak."]
  return "\n".join(out)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,  # see --method-module
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="mnist", choices=list(SHAPES))
  p.add_argument("--batch-size", type=int, default=128, help="paper: 128")
  p.add_argument("--T", type=int, default=10, help="blocks (paper: 10)")
  p.add_argument("--repeats", type=int, default=5, help="timed steps per row (Algorithm 1: x T)")
  p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--cases", nargs="+", default=None, help="case keys or prefixes (default: all)")
  p.add_argument("--skip-inference", action="store_true")
  p.add_argument("--inference-steps", type=int, default=100, help="CT/FM Euler steps (paper: 1000)")
  p.add_argument("--json", action="store_true", help="also print one JSON object per row")
  p.add_argument("--out", type=Path, default=None, help="write the rows to this results file "
                 "(JSON: command, date, machine, versions, settings)")
  p.add_argument("--matmul-size", type=int, default=None, help="default 4096 (GPU/TPU), 2048 (CPU)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
  p.add_argument("--rounds", type=int, default=2, help="rounds of --repeats steps per row, the "
                 "rows taking turns (and of the PyTorch comparison's alternating timings)")
  p.add_argument("--torch-fm-batch", type=int, default=16, help="PyTorch comparison: FM images")
  p.add_argument("--torch-fm-steps", type=int, default=1000, help="PyTorch comparison: FM Euler steps")
  p.add_argument("--method-module", action="append", default=[], metavar="MODULE",
                 help="a module (name or .py file) that registers a method of your own; may repeat")
  p.add_argument("--methods", nargs="*", default=[], help="registered methods: one row each, "
                 "their own step (e.g. your own, with --method-module)")
  p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process: one unit
  p.add_argument("--isolate", default="auto", choices=["auto", "always", "never"],
                 help=argparse.SUPPRESS)  # fresh process per row: where a device peak is reported
  args = p.parse_args(argv)
  try:  # a method of one's own registers before its row is made
    cli.import_method_modules(sys.argv[1:] if argv is None else list(argv))
    specs = cases(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.case:
    for row in run_unit(args.case, args, specs):
      print(json.dumps(row))
    return 0
  keys = select(list(specs), args.cases)

  # The probe runs in a child so that this process holds no device while rows run in theirs.
  info = run_unit("probe", args, specs)[0] if args.isolate == "never" else run_child("probe", args)[0]
  isolate = args.isolate == "always" or (args.isolate == "auto" and info["has_device_peak"])
  run = (lambda unit: run_child(unit, args)) if isolate else (lambda unit: run_unit(unit, args, specs))
  res = info["resolved"]
  # auto reuses the row it resolves to where that row is measured anyway.
  same = next((k for k in keys if k != "auto" and specs[k][1] == "parallel" and res[k] == res["auto"]),
              None)
  train = [k for k in keys if not (k == "auto" and same)]
  if isolate:  # each row's rounds in its own process
    rows = [r for key in train for r in run_child(key, args)]
  else:  # every row's rounds alternate with the others'
    rows = train_rows([(key, *specs[key][1:]) for key in train], args.repeats, args.rounds)
  if "auto" in keys:
    form, k, _ = res["auto"].split("/")
    if same:
      rows.append(dict(next(r for r in rows if r["case"] == same), case="auto", reused=same))
    rows[-1]["name"] = f"auto (= {form}/{k})"  # auto is the last case
  derive(rows, specs, info, args)
  print(train_table(rows, info, args))
  check = auto_check(rows)
  if check:
    print(auto_line(check))
  inf = [] if args.skip_inference else run("inference")
  for r in inf:
    r.update(backend=info["backend"], device_kind=info["device_kind"], dataset=args.dataset,
             precision=args.precision)
  if inf:
    print()
    print(inference_table(inf, args))
  vs_torch = []
  if not args.no_torch and info["backend"] == "cpu" and min(SHAPES[args.dataset][0][:2]) < 14:
    print(f"\n(no PyTorch comparison on {args.dataset}: its images are padded for the paper's "
          "block, which the PyTorch reference does not do)")
  elif not args.no_torch and info["backend"] == "cpu":
    try:
      import torch  # noqa: F401
    except ImportError:
      print("\n(PyTorch is not installed: no comparison; pip install -e '.[torch]')")
    else:
      vs_torch = run("torch")
      print()
      print(torch_table(vs_torch, info, args))
  everything = rows + ([check] if check else []) + inf + vs_torch
  if args.json:
    for r in everything:
      print(json.dumps(r))
  if args.out:
    results.write(args.out, __file__, argv, everything,
                  {k: v for k, v in vars(args).items() if k not in ("case", "isolate", "out", "json")},
                  info["backend"], info["device_kind"], matmul_peak_flops_per_s=info["matmul_flops_per_s"])
    print(f"\nresults: {args.out}")
  return 0


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
