"""What a GPU or TPU user's programs hold, checked on the CPU by lowering them for those
platforms: no conditional in a training step (the GPU runtime waits on the host for
one), JAX's own dropout, the batch order computed once per pass, and every program
compiled before the first epoch."""

import jax
import numpy as np
import pytest

from noprop_jax import data, dropout, trainer
from noprop_jax.config import METHODS, RunConfig, method_settings

DIGITS = data.load("digits")
N = len(DIGITS.train.labels)


def _epoch_step(method: str, backend: str, **kw):
  """(the trainer's epoch step for `method` resolved for `backend`, abstract arguments)."""
  cfg = RunConfig.create(method, dataset="digits", batch_size=64, **kw)
  compute = trainer.resolve_compute(cfg, backend=backend)
  model = trainer.build_model(cfg, DIGITS.train.images.shape[1:], 10, compute, backend=backend)
  state = jax.eval_shape(lambda: trainer.init_state(cfg, model, jax.random.key(0)))
  args = (state, DIGITS.train.images, DIGITS.train.labels, jax.ShapeDtypeStruct((N,), np.int32))
  return trainer.make_epoch_step(cfg, model, compute, N), args


def conditionals(jaxpr, platform: str) -> int:
  """Conditionals that choose at run time in a program lowered for `platform`: every `cond`
  of the jaxpr and of the jaxprs inside it, except `lax.platform_dependent`'s, which
  lowering resolves (only the branch for `platform` is followed)."""
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
      count += 1
    count += sum(conditionals(getattr(j, "jaxpr", j), platform) for j in subs)
  return count


MLP = dict(block="mlp", hidden=32)
STEPS = [("dt", dict(T=2)), ("dt", dict(T=2, **MLP)), ("diffusion_blocks", dict(T=2)),
         ("ct", MLP), ("fm", MLP), ("backprop", dict(T=2, **MLP)), ("adjoint", MLP),
         ("local", dict(T=2, **MLP)), ("dt", dict(T=2, training="sequential", **MLP))]


def test_every_method_is_checked():
  assert {m for m, _ in STEPS} == set(METHODS)


@pytest.mark.parametrize("method, kw", STEPS)
def test_gpu_steps_guard_their_update_without_a_conditional(method, kw):
  """The non-finite guard is a select on GPU and TPU (the step never waits on the host),
  a `lax.cond` on XLA:CPU (which does not copy the state once more)."""
  step, args = _epoch_step(method, "gpu", **kw)
  jaxpr = step.trace(*args).jaxpr.jaxpr
  for platform in ("cuda", "rocm", "tpu"):
    assert conditionals(jaxpr, platform) == 0, platform
  assert conditionals(jaxpr, "cpu") == 1  # the guard


def test_dropout_is_jaxs_own_off_the_cpu():
  """The same mask everywhere; the hash written out (and materialised once) on XLA:CPU only."""
  f = lambda k, x: dropout.keep_mask(k, 0.8, x.shape)
  traced = jax.jit(f).trace(jax.random.key(0), jax.ShapeDtypeStruct((16, 32), np.float32))
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  for platform in ("cuda", "tpu"):
    other = traced.lower(lowering_platforms=(platform,)).as_text()
    assert "threefry2x32" in other and "optimization_barrier" not in other, platform
  assert "optimization_barrier" in cpu and "threefry2x32" not in cpu
  x = np.ones((16, 32), np.float32)
  want = jax.random.bernoulli(jax.random.key(3), 0.8, x.shape)
  np.testing.assert_array_equal(jax.jit(f)(jax.random.key(3), x), want)


def test_the_batch_order_is_computed_once_per_pass_not_per_step():
  """A permutation is two sorts of the whole training split: the step takes its batch from
  the pass's order and sorts nothing."""
  step, args = _epoch_step("dt", "gpu", T=2, **MLP)
  hlo = step.lower(*args).compile().as_text()
  assert " sort(" not in hlo
  order = trainer.batch_order.lower(jax.random.key_data(jax.random.key(0)), np.int32(0), N, 22)
  assert " sort(" in order.compile().as_text()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_methods_programs_are_compiled_before_the_first_epoch(method, tmp_path, traces):
  """`setup` compiles the step and both evaluators; an epoch and its evaluation then trace
  (and compile) nothing, so epoch times are training alone. The summary reports the
  compile time apart."""
  kw = dict(T=2) if "T" in method_settings(method) else {}  # the methods with stacked blocks
  cfg = RunConfig.create(method, dataset="digits", batch_size=128, epochs=1, block="mlp",
                         hidden=16, inference_runs=1, inference_steps=2
                         if method in ("ct", "fm", "adjoint") else None, **kw)
  run, state = trainer.setup(cfg, tmp_path, DIGITS, print_fn=lambda _: None)
  assert run.compile_seconds > 0
  traces.clear()
  state, *_ = trainer.run_epoch(run, state, 0, 10**9, 10**9, False, None, 0.0)
  trainer.evaluate(run, state, jax.random.key(0))
  assert [t for t in traces if t != "batch_order"] == [], traces
  run.ckpt.close()
