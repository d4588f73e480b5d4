"""What a GPU or TPU user's programs hold, checked on the CPU by lowering them for those
platforms: no conditional in a training step (the GPU runtime waits on the host for
one), JAX's own dropout, the batch order computed once per pass, and every program
compiled before the first epoch."""

import time

import jax
import numpy as np
import pytest

from conftest import build, library_methods
from noprop_jax import dropout, trainer
from noprop_jax.config import RunConfig, method_settings


def _epoch_step(digits, method: str, backend: str, **kw):
  """(the trainer's epoch step for `method` resolved for `backend`, abstract arguments)."""
  cfg = RunConfig.create(method, dataset="digits", batch_size=64, **kw)
  compute, model = build(cfg, backend=backend)
  state = jax.eval_shape(lambda: trainer.init_state(cfg, model, jax.random.key(0)))
  n = len(digits.train.labels)
  args = (state, digits.train.images, digits.train.labels, jax.ShapeDtypeStruct((n,), np.int32))
  return trainer.make_epoch_step(cfg, model, compute, n), args


def conditionals(jaxpr, platform: str, masks: bool = True) -> int:
  """Conditionals that choose at run time in a program lowered for `platform`: every `cond`
  of the jaxpr and of the jaxprs inside it, except `lax.platform_dependent`'s, which
  lowering resolves (only the branch for `platform` is followed). `masks=False` leaves out
  those whose results are all boolean: the CPU dropout masks, made inside a conditional so
  that XLA computes each once (`dropout.keep_mask`), not a choice the step waits on."""
  count = 0
  for eqn in jaxpr.eqns:
    subs = [v for p in eqn.params.values() for v in (p if isinstance(p, (tuple, list)) else [p])
            if isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr))]
    if eqn.primitive.name == "cond" and eqn.params.get("branches_platforms"):
      chosen = [i for i, ps in enumerate(eqn.params["branches_platforms"])
                if ps is not None and platform in ps]
      default = [i for i, ps in enumerate(eqn.params["branches_platforms"]) if ps is None]
      subs = [eqn.params["branches"][(chosen or default)[0]]]
    elif eqn.primitive.name == "cond":
      count += masks or not all(v.aval.dtype == np.bool_ for v in eqn.outvars)
    count += sum(conditionals(getattr(j, "jaxpr", j), platform, masks) for j in subs)
  return count


MLP = dict(block="mlp", hidden=32)
STEPS = [("dt", dict(T=2)), ("dt", dict(T=2, **MLP)), ("diffusion_blocks", dict(T=2)),
         ("ct", MLP), ("fm", MLP), ("backprop", dict(T=2, **MLP)), ("adjoint", MLP),
         ("local", dict(T=2, **MLP)), ("dt", dict(T=2, training="sequential", **MLP))]


def test_every_method_is_checked():
  assert {m for m, _ in STEPS} == set(library_methods())


@pytest.mark.parametrize("method, kw", STEPS)
def test_gpu_steps_guard_their_update_without_a_conditional(method, kw, digits):
  """The non-finite guard is a select on GPU and TPU (the step never waits on the host),
  a `lax.cond` on XLA:CPU (which does not copy the state once more)."""
  step, args = _epoch_step(digits, method, "gpu", **kw)
  jaxpr = step.trace(*args).jaxpr.jaxpr
  for platform in ("cuda", "rocm", "tpu"):
    assert conditionals(jaxpr, platform) == 0, platform
  assert conditionals(jaxpr, "cpu", masks=False) == 1  # the guard


def test_dropout_is_jaxs_own_off_the_cpu():
  """The same mask everywhere; the hash written out, inside a conditional (so that XLA
  computes it once, into a buffer of its own), on XLA:CPU only."""
  f = lambda k, x: dropout.keep_mask(k, 0.8, x.shape)
  traced = jax.jit(f).trace(jax.random.key(0), jax.ShapeDtypeStruct((16, 32), np.float32))
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  for platform in ("cuda", "tpu"):
    other = traced.lower(lowering_platforms=(platform,)).as_text()
    assert "threefry2x32" in other and conditionals(traced.jaxpr.jaxpr, platform) == 0, platform
  assert "threefry2x32" not in cpu and conditionals(traced.jaxpr.jaxpr, "cpu") == 1
  x = np.ones((16, 32), np.float32)
  want = jax.random.bernoulli(jax.random.key(3), 0.8, x.shape)
  np.testing.assert_array_equal(jax.jit(f)(jax.random.key(3), x), want)


def test_the_batch_order_is_computed_once_per_pass_not_per_step(digits):
  """A permutation is two sorts of the whole training split: the step takes its batch from
  the pass's order and sorts nothing."""
  step, args = _epoch_step(digits, "dt", "gpu", T=2, **MLP)
  hlo = step.lower(*args).compile().as_text()
  assert " sort(" not in hlo
  n = len(digits.train.labels)
  order = trainer.batch_order.lower(jax.random.key_data(jax.random.key(0)), np.int32(0), n, 22)
  assert " sort(" in order.compile().as_text()


@pytest.mark.parametrize("method", library_methods())
def test_every_methods_programs_are_compiled_before_the_first_epoch(method, tmp_path, traces,
                                                                     digits):
  """`setup` compiles the step and both evaluators; an epoch and its evaluation then trace
  (and compile) nothing, so epoch times are training alone. The summary reports the
  compile time apart. (`traces`, not chex: nothing at all may compile, not only the
  method's own functions.)"""
  kw = dict(T=2) if "T" in method_settings(method) else {}  # the methods with stacked blocks
  cfg = RunConfig.create(method, dataset="digits", batch_size=128, epochs=1, block="mlp",
                         hidden=16, inference_runs=1, inference_steps=2
                         if method in ("ct", "fm", "adjoint") else None, **kw)
  t0 = time.perf_counter()
  run, state = trainer.setup(cfg, tmp_path, digits, print_fn=lambda _: None)
  # Measured inside setup: positive (compiling takes time) and no more than setup took.
  assert 0 < run.compile_seconds <= time.perf_counter() - t0
  traces.clear()
  state, *_ = trainer.run_epoch(run, state, 0, 10**9, 10**9, False, 0.0)
  trainer.evaluate(run, state, jax.random.key(0))
  assert [t for t in traces if t != "batch_order"] == [], traces
  run.ckpt.close()
