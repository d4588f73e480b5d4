"""Fitting programs to the device's memory: the largest blocks_per_step, and the largest
evaluation batch, whose compiled program XLA's memory analysis says fits.

Both compile ahead of time, before any epoch, so that epoch times are training alone.
"""

import dataclasses
from typing import Callable

import jax

from noprop_jax import core
from noprop_jax.config import RunConfig
from noprop_jax.programs import EVAL_BATCH, build_model, make_epoch_step, make_evaluator, resolve_compute


def _fit(what: str, candidates: list, compile_one: Callable, limit_bytes: float | None,
         fraction: float, advice: str):
  """(candidate, compiled program) for the first candidate whose program needs at most
  `fraction` of the device's memory (XLA's memory analysis, per device; `limit_bytes`
  overrides the limit, taken whole). A device that reports no memory (XLA:CPU) takes the
  first. A MemoryError naming every candidate's need where none fits."""
  # A device of this process: another host's devices report nothing here (an error).
  limit = limit_bytes or (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  allowed = limit if limit_bytes else (fraction * limit if limit else None)
  need = {}
  for c in candidates:
    compiled = compile_one(c)
    need[c] = core.peak_bytes(compiled)
    if allowed is None or need[c] is None or need[c] <= allowed:
      return c, compiled
  raise MemoryError(
      f"no {what} fits in the device's {limit / 2**30:.2f} GiB (use at most "
      f"{allowed / limit:.0%} of it): " + ", ".join(f"{what} {c} needs {b / 2**30:.2f} GiB"
                                                     for c, b in need.items()) + f"; {advice}")


def fit_blocks_per_step(cfg: RunConfig, num_classes: int, n_train: int, state, inputs, labels,
                        order, fraction: float = 0.9, limit_bytes: float | None = None):
  """(compute, model, compiled epoch step) with blocks_per_step 0 (auto) resolved.

  All T blocks at once is fastest; where the device reports its memory (GPU/TPU), the
  largest divisor k of T whose compiled step needs at most `fraction` of it is taken
  (`_fit`). On XLA:CPU, which reports none, all T. Other methods and settings compile
  as they are."""
  compute = resolve_compute(cfg)
  model = lambda c: build_model(cfg, inputs.shape[1:], num_classes, c)
  auto = (cfg.method_record.side_by_side and cfg.train.training == "parallel"
          and not cfg.train.blocks_per_step and compute.formulation != "scan")
  candidates = [k for k in range(cfg.T, 0, -1)
                if cfg.T % k == 0 and k % cfg.train.mesh_shape["blocks"] == 0]
  candidates = candidates if auto else [compute.blocks_per_step]
  k, compiled = _fit(
      "blocks_per_step", candidates,
      lambda k: _compile(make_epoch_step, cfg, model(_with_k(compute, k)), _with_k(compute, k),
                         n_train, args=(state, inputs, labels, order)),
      limit_bytes, fraction,
      "lower --batch-size or shard the blocks over more devices (--mesh blocks=N)")
  return _with_k(compute, k), model(_with_k(compute, k)), compiled


def _with_k(compute: core.Compute, k: int) -> core.Compute:
  return dataclasses.replace(compute, blocks_per_step=k)


def _compile(make: Callable, *settings, args: tuple):
  """`make(*settings)` lowered for `args` and compiled (ahead of time: before any epoch)."""
  return make(*settings).lower(*args).compile()


def fit_evaluator(cfg: RunConfig, model, compute: core.Compute, runs: int, state, inputs,
                  labels, key, fraction: float = 0.9, limit_bytes: float | None = None):
  """The compiled evaluator (`make_evaluator`) of a split, its batch the largest of 500,
  250, 125, ... (multiples of the mesh's data axis) that needs at most `fraction` of the
  device's memory (`_fit`): with many inference paths at once, evaluation can need more
  than a training step."""
  n, nd = len(labels), cfg.train.mesh_shape["data"]
  top = max(nd, min(EVAL_BATCH, n) // nd * nd)
  candidates = sorted({max(nd, top // 2**i // nd * nd) for i in range(top.bit_length())},
                      reverse=True)
  return _fit("evaluation batch", candidates,
              lambda b: _compile(make_evaluator, cfg, model, compute, n, runs, b,
                                 args=(state, inputs, labels, key)),
              limit_bytes, fraction, "lower --inference-runs or shard over more devices "
              "(--mesh data=N)")[1]
