"""NoProp-CT/FM inference: time per image and accuracy at several solver step counts,
with the image pathway hoisted out of the solver loop, and with the whole block
evaluated at every step.

  python experiments/inference_benchmark.py --workdir runs/fm5 --data-dir ../shared/data/mnist
  python experiments/inference_benchmark.py --method ct --dataset mnist   # untrained: timing only

Three implementations are timed side by side in one run on the same images
(the machine is shared and noisy: compare the ratios; each time is the median of
--repeats calls, min and max kept in --out's results file):
  hoisted   the image term once per image, then only the small head per step;
  naive     the whole block called at every step inside the jitted solver, as
            a straightforward JAX version would write it: XLA's loop-invariant
            code motion may hoist the conv tower out of the loop by itself;
  per_step  the whole block really run at every step (the images pass an
            optimization barrier with t), as an eager framework runs it.
Accuracy is measured on the whole test split with hoisted inference (a test
checks that the three give the same predictions; the timed images check it
again here).
"""

import argparse
import dataclasses
import json
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from noprop_jax import core, ct, fm, host_memory, solvers, trainer
from noprop_jax.config import RunConfig

import results  # experiments/ (the script's folder) is on sys.path

IMPLS = ("hoisted", "naive", "per_step")
# (input shape, number of classes) of the named datasets, for an untrained model.
SHAPES = {"digits": ((8, 8, 1), 10), "mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
          "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
          "tiny_imagenet": ((64, 64, 3), 200)}


def _module(model):
  if isinstance(model, ct.Model):
    return ct
  if isinstance(model, fm.Model):
    return fm
  raise ValueError(f"this benchmark is for NoProp-CT and -FM models, got {type(model).__name__}")


def vector_field(model, state, impl: str):
  """f(t, z, x) for `solvers.euler` that calls the *whole* block at every step; x are the
  inputs (as floats), t a scalar, z [B, d]. impl 'naive': as a straightforward JAX
  version would write it (under jit, XLA may still hoist the loop-invariant conv tower
  out of the solver loop by itself); 'per_step': the inputs pass an optimization
  barrier together with t, so the whole block really runs at every step (what an eager
  framework does). CT: the probability-flow ODE's drift; FM: the learned velocity.
  The library's own (hoisted) field is `ct.probability_flow` / `fm.velocity`."""
  if impl not in ("naive", "per_step"):
    raise ValueError(f"unknown whole-block impl {impl!r}; choose 'naive' or 'per_step'")
  params, is_ct = state["params"], _module(model) is ct
  W = core.embedding_matrix(params, model.num_classes)

  def u_hat(t, z, x):
    if impl == "per_step":
      x, t = jax.lax.optimization_barrier((x, t))
    logits, _ = core.apply(model.block, {"params": params["block"]}, x, z,
                           jnp.full((z.shape[0],), t))
    return (jax.nn.softmax(logits) if is_ct else logits) @ W

  if not is_ct:
    return u_hat

  def pf_ode(t, z, x):
    s = ct.schedule_at(model, params, t)
    return (-0.5 * s.gamma_prime) * (jnp.sqrt(s.alpha_bar) * u_hat(t, z, x) - s.alpha_bar * z)

  return pf_ode


@partial(jax.jit, static_argnames=("model", "steps", "impl", "mode"))
def predict(model, state, x, steps: int | None = None, impl: str = "hoisted",
            key: jax.Array | None = None, mode: str = "mean") -> jax.Array:
  """Class scores of CT/FM inference by Euler in `steps` steps (default the model's).
  'hoisted' is the library's `predict` (the block's z- and t-independent pathway once
  per input); 'naive' and 'per_step' call the whole block at every step
  (`vector_field`), with the same starting noise as the library's for `key`."""
  mod = _module(model)
  if impl == "hoisted":
    return mod.predict(model, state, x, key, mode, steps=steps)
  if mod is ct and model.ct_sampler == "sde" and mode == "stochastic":
    raise ValueError("the SDE sampler is benchmarked hoisted only")
  core.check_inputs(x, model.input_shape)
  if key is not None and mod is ct:  # ct.predict draws z_0 from the first half of its key
    key = jax.random.split(key)[0]
  z0 = core.inference_noise(mode, (x.shape[0], model.dim), key)
  z1 = solvers.euler(vector_field(model, state, impl), z0, 0.0, 1.0,
                     steps or model.inference_steps, core.to_float(x))
  return mod.class_scores(model, state, z1)


def _timed(model, state, x, steps: int, impl: str, repeats: int) -> tuple[list[float], jax.Array]:
  """(seconds of each call, scores) of `predict`, compiled ahead of time (not timed):
  `repeats` calls, or fewer once 5 s have been spent (the slow per-step rows at 1000 steps)."""
  compiled = predict.lower(model, state, x, steps, impl).compile()
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(state, x))
    times.append(time.perf_counter() - t0)
    if sum(times) > 5.0 and len(times) >= 2:
      break
  return times, out


def _fmt(a: float | None) -> str:
  return "n/a" if a is None else f"{a:.4f}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", help="a CT or FM training run (its latest checkpoint is used)")
  p.add_argument("--method", default="fm", help="ct|fm, without --workdir")
  p.add_argument("--dataset", default="mnist", help="without --workdir")
  p.add_argument("--data-dir", default=None, help="dataset files, for accuracy (else TFDS)")
  p.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
  p.add_argument("--time-images", type=int, default=200, help="images in the timed batch")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per row (fewer past 5 s)")
  p.add_argument("--json", action="store_true", help="also print one JSON line per row")
  p.add_argument("--out", default=None, metavar="FILE",
                 help="write the rows as a results file (JSON with command, date, machine, "
                 "versions and settings)")
  args = p.parse_args(argv)

  from noprop_jax.data import load

  if args.workdir:
    cfg, model, state, step = trainer.load_run(args.workdir)
    if cfg.method not in ("ct", "fm"):
      print(f"error: {args.workdir} holds a {cfg.method} run; this benchmark is for ct and fm",
            file=sys.stderr)
      return 2
  else:
    if args.method not in ("ct", "fm") or args.dataset not in SHAPES:
      print(f"error: without --workdir give --method ct|fm and --dataset one of {list(SHAPES)}",
            file=sys.stderr)
      return 2
    cfg = RunConfig.create(args.method, dataset=args.dataset)
    shape, m = SHAPES[args.dataset]
    model = trainer.build_model(cfg, shape, m, trainer.resolve_compute(cfg))
    state, step = trainer.init_state(cfg, model, jax.random.key(0)), 0
  compute = trainer.resolve_compute(cfg)
  dataset = cfg.data.dataset
  ds = None
  if args.workdir:
    ds = load(dataset, args.data_dir or cfg.data.data_dir, verify=cfg.data.verify)
    images = ds.test.images
  else:
    images = np.random.RandomState(0).uniform(size=(args.time_images, *model.input_shape)).astype(np.float32)
  x_time = jnp.asarray(images[:args.time_images])
  n = x_time.shape[0]
  print(f"NoProp-{cfg.method.upper()} on {dataset} ({'step ' + str(step) + ' of ' + args.workdir if args.workdir else 'untrained'}), "
        f"backend {jax.default_backend()}, {n} timed images, mean path (z_0 = 0)")
  rows = []
  print(f"{'steps':>6} {'hoisted':>9} {'naive':>9} {'per_step':>9}   ms per image (median);  "
        f"{'per_step/hoisted':>16} {'naive/hoisted':>13} {'same preds':>10} {'test acc':>9} "
        f"{'stoch acc':>9}")
  for steps in args.steps:
    runs, scores = {}, {}
    for impl in IMPLS:
      runs[impl], scores[impl] = _timed(model, state, x_time, steps, impl, args.repeats)
    times = {k: float(np.median(v)) for k, v in runs.items()}
    pred = {k: jnp.argmax(v, -1) for k, v in scores.items()}
    same = min(float(jnp.mean(pred["hoisted"] == pred[k])) for k in ("naive", "per_step"))
    acc = stoch = None  # no labels for an untrained, random-image run
    if ds is not None:
      m_steps = dataclasses.replace(model, inference_steps=steps)
      ev = trainer.make_evaluator(cfg, m_steps, compute, len(ds.test.labels), runs=1)
      a_mean, a_stoch = jax.device_get(ev(state, jnp.asarray(ds.test.images),
                                          jnp.asarray(ds.test.labels), jax.random.key(1)))
      acc, stoch = float(a_mean), float(a_stoch[0])
    ms = {k: 1e3 * v / n for k, v in times.items()}
    row = {"method": cfg.method, "dataset": dataset, "steps": steps,
           **{f"{k}_ms_per_image": v for k, v in ms.items()},
           **{f"{k}_ms_per_image_min": 1e3 * min(v) / n for k, v in runs.items()},
           **{f"{k}_ms_per_image_max": 1e3 * max(v) / n for k, v in runs.items()},
           **{f"{k}_calls": len(v) for k, v in runs.items()},
           "speedup_vs_per_step": times["per_step"] / times["hoisted"],
           "speedup_vs_naive": times["naive"] / times["hoisted"], "same_predictions": same,
           "test_accuracy": acc, "test_accuracy_stochastic": stoch,
           "backend": jax.default_backend()}
    print(f"{steps:>6} {ms['hoisted']:>9.3f} {ms['naive']:>9.3f} {ms['per_step']:>9.3f}"
          f"{'':16}{row['speedup_vs_per_step']:>15.1f}x {row['speedup_vs_naive']:>12.1f}x "
          f"{same:>10.4f} {_fmt(acc):>9} {_fmt(stoch):>9}")
    rows.append(row)
    if args.json:
      print(json.dumps(row))
  if args.out:
    results.write(args.out, __file__, argv, rows,
                  settings={"method": cfg.method, "dataset": dataset, "steps": args.steps,
                            "timed_images": n, "repeats": args.repeats,
                            "workdir": args.workdir, "trained_step": step})
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
