"""Time one parallel NoProp-DT step of T blocks against T one-block steps (Algorithm 1).

  python experiments/benchmark.py                       # MNIST shapes, batch 128, T = 10
  python experiments/benchmark.py --dataset cifar10 --formulations unroll vmap scan

Both are measured side by side in one run (the machine is shared and noisy, so
compare the ratio rather than absolute times). Random data of the dataset's shape.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from noprop_jax import dt
from noprop_jax.config import Config


def _time(fn, state, x, y, n):
  t0 = time.perf_counter()
  state, m = fn(state, x, y)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = fn(state, x, y)
  jax.block_until_ready(m["loss"])
  return compile_s, (time.perf_counter() - t0) / n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--T", type=int, default=10)
  p.add_argument("--formulations", nargs="+", default=["auto"])
  p.add_argument("--repeats", type=int, default=3, help="timed parallel steps (x T one-block steps)")
  args = p.parse_args(argv)
  base = dict(dataset=args.dataset, batch_size=args.batch_size, T=args.T)
  cfg = Config.create(**base)
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.uniform(kx, (args.batch_size, *cfg.image_shape))
  y = jax.random.randint(ky, (args.batch_size,), 0, cfg.num_classes)
  print(f"backend {jax.default_backend()}, {args.dataset} shapes, batch {args.batch_size}, T={args.T}")

  seq = jax.jit(lambda s, x, y: dt.sequential_step(cfg, s, x, y, s["step"] % cfg.T),
                donate_argnums=0)
  c, t_one = _time(seq, dt.init(cfg, jax.random.key(0)), x, y, args.repeats * args.T)
  print(f"{'one block per step (Algorithm 1)':40s} compile {c:6.1f}s  {t_one:7.3f}s/step  "
        f"x T = {t_one * args.T:7.3f}s")
  for form in args.formulations:
    cfg_f = Config.create(**base, formulation=form)
    c, t_par = _time(dt.make_train_step(cfg_f), dt.init(cfg_f, jax.random.key(0)), x, y,
                     args.repeats)
    name = f"all {args.T} blocks, {cfg_f.resolved_formulation()}/{cfg_f.resolved_conv_impl()}"
    print(f"{name:40s} compile {c:6.1f}s  {t_par:7.3f}s/step  ratio to T one-block steps "
          f"{t_par / (t_one * args.T):.2f}")


if __name__ == "__main__":
  main()
