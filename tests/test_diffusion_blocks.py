"""DiffusionBlocks: the noise partition, the preconditioning, block independence, one call
of each block at inference, training, and clear errors on bad settings."""

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees, make_model
from noprop_jax import blocks, core, dt, trainer
from noprop_jax import diffusion_blocks as db
from noprop_jax.config import RunConfig
from noprop_jax.core import Compute, Optim

M, D = 10, 16
# The models: `make_model("diffusion_blocks", T=..., **SMALL)`, at the digits' shapes.
SMALL = dict(block="mlp", hidden=32, depth=1, dropout=0.0, embedding_dim=D)


def _lognormal_cdf(sigma, p_mean=-1.2, p_std=1.2):
  """An independent reference: the log-normal CDF through math.erf."""
  return 0.5 * (1.0 + math.erf((math.log(sigma) - p_mean) / (p_std * math.sqrt(2.0))))


# ----------------------------------------------------------------------------- noise levels

def test_partition_of_three_blocks_is_the_published_one():
  bounds = db.partition(make_model("diffusion_blocks", T=3, **SMALL))
  np.testing.assert_allclose(bounds, [0.002, 0.180, 0.505, 80], atol=5e-4)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 10])
def test_every_interval_holds_an_equal_share_of_the_restricted_lognormal(T):
  bounds = db.partition(make_model("diffusion_blocks", T=T, **SMALL))
  assert bounds[0] == 0.002 and bounds[-1] == 80 and np.all(np.diff(bounds) > 0)
  total = _lognormal_cdf(80) - _lognormal_cdf(0.002)
  shares = [(_lognormal_cdf(hi) - _lognormal_cdf(lo)) / total for lo, hi in zip(bounds, bounds[1:])]
  np.testing.assert_allclose(shares, 1.0 / T, rtol=1e-9)


def test_intervals_run_from_the_noisiest_and_widen_by_the_overlap_in_log_sigma():
  plain = db.intervals(make_model("diffusion_blocks", T=3, overlap=0.0, **SMALL))
  bounds = db.partition(make_model("diffusion_blocks", T=3, **SMALL))
  np.testing.assert_allclose(plain, [[bounds[2], bounds[3]], [bounds[1], bounds[2]],
                                     [bounds[0], bounds[1]]])
  wide = db.intervals(make_model("diffusion_blocks", T=3, overlap=0.1, **SMALL))
  lo, hi = np.log(plain[:, 0]), np.log(plain[:, 1])
  w = hi - lo
  np.testing.assert_allclose(np.log(wide[:, 0]), np.maximum(lo - 0.1 * w, np.log(0.002)))
  np.testing.assert_allclose(np.log(wide[:, 1]), np.minimum(hi + 0.1 * w, np.log(80)))
  assert wide[0, 1] == 80 and wide[2, 0] == 0.002  # clipped to the range


def test_inference_levels_fall_one_in_each_block():
  levels = db.inference_levels(make_model("diffusion_blocks", T=3, **SMALL))
  np.testing.assert_allclose(levels, [80, 0.301, 0.002], atol=5e-4)
  for T in (2, 4, 7):
    levels = db.inference_levels(make_model("diffusion_blocks", T=T, **SMALL))
    own = db.intervals(make_model("diffusion_blocks", T=T, overlap=0.0, **SMALL))
    assert np.all(np.diff(levels) < 0)
    assert np.all((own[:, 0] * (1 - 1e-9) <= levels) & (levels <= own[:, 1] * (1 + 1e-9))), T


@pytest.mark.parametrize("b", [0, 1, 2])
def test_noise_levels_are_drawn_from_the_blocks_own_interval_by_the_restricted_lognormal(b):
  model = make_model("diffusion_blocks", T=3, overlap=0.1, **SMALL)
  sigma = np.asarray(db.sample_sigma(model, jnp.int32(b), jax.random.key(b), (20000,)), np.float64)
  lo, hi = db.intervals(model)[b]
  assert sigma.min() >= lo * (1 - 1e-5) and sigma.max() <= hi * (1 + 1e-5)
  # Mapped through the restricted CDF, draws of the right law are uniform on [0, 1].
  u = np.array([(_lognormal_cdf(s) - _lognormal_cdf(lo)) / (_lognormal_cdf(hi) - _lognormal_cdf(lo))
                for s in sigma])
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
  assert abs(np.mean(u < 0.25) - 0.25) < 0.015


def test_preconditioning_keeps_unit_variance_and_its_identities_over_the_whole_range():
  sigma = jnp.asarray(np.geomspace(0.002, 80, 200), jnp.float32)
  c_in, c_skip, c_out = db.precondition(sigma, 0.5)
  np.testing.assert_allclose(c_skip + c_out**2 / 0.25, 1.0, rtol=1e-5)
  np.testing.assert_allclose(c_in**2 * (sigma**2 + 0.25), 1.0, rtol=1e-5)
  np.testing.assert_allclose(db.loss_weight(sigma, 0.5), 1.0 / c_out**2, rtol=1e-4)
  np.testing.assert_allclose(db.loss_weight(jnp.float32(0.002), 0.5), 250_004, rtol=1e-4)
  t = db.noise_time(make_model("diffusion_blocks", T=3, **SMALL), sigma)
  np.testing.assert_allclose([t[0], t[-1]], [1.0, 0.0], atol=1e-6)
  assert np.all(np.diff(np.asarray(t)) < 0)


# ----------------------------------------------------------------------------- the objective

def _state(model, seed=0):
  state = db.init(model, jax.random.key(seed))
  # A trained-looking head and table, so that gradients reach the blocks at the first step.
  k1, k2 = jax.random.split(jax.random.key(seed + 100))
  state["shared"]["head"]["kernel"] = jax.random.normal(k1, (D, M))
  state["shared"]["embed"] = jax.random.normal(k2, (M, D))
  return state


def _batch(digits, n=32):
  return digits.train.images[:n], digits.train.labels[:n]


@pytest.mark.parametrize("formulation", ["vmap", "scan"])  # unroll: the next test
def test_block_gradients_are_the_objectives_gradient_and_depend_on_their_own_block_only(
    formulation, digits):
  model, (x, y) = make_model("diffusion_blocks", T=3, **SMALL), _batch(digits)
  state = _state(model)
  compute = Compute(formulation).resolve(model.T)
  g_blocks, g_shared, aux = db.gradients(model, compute, state, x, y)
  # The same as autodiff of the whole objective with the step's key.
  f = lambda b, s: db.loss(model, {"params": b}, s, x, y, core.step_key(state))
  (value, metrics), (ref_b, ref_s) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      state["blocks"]["params"], state["shared"])
  # ... from the same terms, weighted alike (1 / T each, the chance of drawing the block).
  np.testing.assert_allclose(aux["block_loss"], metrics["block_loss"], rtol=1e-5)
  assert db.block_weight(model) == pytest.approx(1 / 3)
  np.testing.assert_allclose(value, np.sum(db.block_weight(model) * aux["block_loss"]), rtol=1e-5)
  # w(sigma) reaches 2.5e5: float reordering shows at ~1e-6 of the leaf's scale.
  assert_trees((g_blocks, g_shared), (ref_b, ref_s), rtol=1e-3,
               atol=lambda ref: 1e-4 * float(np.abs(np.asarray(ref)).max()))
  for g in jax.tree.leaves(g_blocks):  # every block's every parameter array gets a gradient
    assert np.all(np.abs(np.asarray(g)).reshape(model.T, -1).max(axis=1) > 0), g.shape
  # Block 0's gradient does not move when blocks 1 and 2 change.
  other = jax.tree.map(lambda a: a.at[1:].multiply(1.5), state["blocks"])
  g_other, _, _ = db.gradients(model, compute, {**state, "blocks": other}, x, y)
  first = lambda tree: jax.tree.map(lambda a: a[0], tree)
  assert_trees(first(g_other), first(g_blocks), what="block 0")
  for a, b in zip(jax.tree.leaves(g_blocks), jax.tree.leaves(g_other)):
    assert not np.allclose(a[1:], b[1:])


def test_each_block_updates_by_its_own_optimizer_and_the_shared_parts_by_the_mean(digits):
  model, (x, y) = make_model("diffusion_blocks", T=3, **SMALL), _batch(digits)
  state = _state(model)
  compute = Compute("vmap").resolve(model.T)
  new, m = jax.jit(partial(db.train_step, model, Optim(), compute))(state, x, y)
  assert m["block_loss"].shape == m["block_accuracy"].shape == (3,) and float(m["skipped"]) == 0
  np.testing.assert_allclose(m["loss"], np.mean(m["block_loss"]), rtol=1e-6)
  # AdamW's first step moves every parameter by about lr, whatever its gradient's scale.
  for a, b in zip(jax.tree.leaves(state["blocks"]["params"]), jax.tree.leaves(new["blocks"]["params"])):
    step = np.abs(np.asarray(b) - np.asarray(a)).max(axis=tuple(range(1, a.ndim)))
    assert np.all(step > 5e-4) and np.all(step < 2e-3)
  np.testing.assert_array_equal(new["opt_blocks"][1][0].count, [1, 1, 1])


def test_every_blocks_per_step_setting_gives_the_same_step(digits):
  model, (x, y) = make_model("diffusion_blocks", T=4, **SMALL), _batch(digits)
  state = _state(model)
  run = lambda c: jax.jit(partial(db.train_step, model, Optim(), c.resolve(4)))(state, x, y)
  ref, m_ref = run(Compute("vmap"))
  for c in (Compute("unroll"), Compute("vmap", 2), Compute("scan")):
    new, m = run(c)
    np.testing.assert_allclose(m["block_loss"], m_ref["block_loss"], rtol=1e-5)
    assert_trees(ref["blocks"], new["blocks"], atol=2e-5, rtol=1e-7, what=str(c))


# ----------------------------------------------------------------------------- inference

CALLS = []


class TaggedBlock(nn.Module):
  """Records (its tag, t) in CALLS at every call: which block ran, at which noise level."""

  @nn.compact
  def __call__(self, x, z, t, train=False):
    tag = self.param("tag", nn.initializers.zeros, ())
    jax.debug.callback(lambda tag, t: CALLS.append((int(tag), float(t[0]))), tag, t,
                       ordered=True)  # in program order, as the chain runs
    return nn.Dense(z.shape[-1])(z)


@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("formulation", ["unroll", "vmap", "scan"])
def test_inference_calls_each_block_once_from_the_noisiest(T, formulation, digits):
  model = db.Model(TaggedBlock(), (8, 8, 1), M, T=T, embedding_dim=D)
  state = db.init(model, jax.random.key(0))
  state["blocks"]["params"]["tag"] = jnp.arange(T, dtype=jnp.float32)
  CALLS.clear()
  logits = db.predict(model, state, digits.test.images[:4], compute=Compute(formulation))
  jax.effects_barrier()
  assert logits.shape == (4, M)
  calls = list(CALLS)
  assert [c[0] for c in calls] == list(range(T))
  t_expected = np.asarray(db.noise_time(model, jnp.asarray(db.inference_levels(model))))
  np.testing.assert_allclose([c[1] for c in calls], t_expected, atol=1e-5)
  assert db.block_calls(model) == T


def test_the_euler_step_moves_z_towards_the_denoised_estimate(digits):
  model = make_model("diffusion_blocks", T=3, **SMALL)
  state = _state(model)
  x = core.to_float(digits.test.images[:8])
  compute = Compute("vmap")
  levels = db.inference_levels(model)
  # By hand: the chain of `sample`, level by level.
  z = jnp.zeros((8, D))
  E = db.embedding(state["shared"])
  for b in range(3):
    v = core.take(state["blocks"], b)
    _, logits, _ = db.denoise(model, v, state["shared"], x, z, jnp.full((8, 1), levels[b]))
    if b < 2:
      D_hat = jax.nn.softmax(logits) @ E
      z = z + (levels[b + 1] - levels[b]) / levels[b] * (z - D_hat)
  np.testing.assert_allclose(db.sample(model, compute, state, x, jnp.zeros((8, D))), logits,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(db.embedding(state["shared"]), axis=-1), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- training

def test_trains_on_the_digits_from_the_command_line_settings(tmp_path):
  cfg = RunConfig.create("diffusion_blocks", dataset="digits", block="mlp", hidden=128, epochs=8,
                         inference_runs=1)
  s = trainer.train(cfg, tmp_path, progress=False, print_fn=lambda _: None)
  assert s["test_accuracy"] > 0.85, s["test_accuracy"]  # chance is 0.1
  assert s["test_accuracy_stochastic"] > 0.8, s


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("kw, match", [
    (dict(T=0), "number of blocks"), (dict(overlap=-0.1), "overlap"),
    (dict(overlap=float("nan")), "overlap"), (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (dict(p_std=0.0), "p_std"), (dict(embedding_dim=0), "embedding_dim")])
def test_bad_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    db.Model(None, (8, 8, 1), M, **kw)
  with pytest.raises(ValueError, match=match):
    RunConfig.create("diffusion_blocks", **kw)


def test_a_block_without_t_or_of_the_wrong_output_size_is_refused():
  with pytest.raises(ValueError, match=r"block\(x, z, t\).*MLPBlock.*time-conditioned"):
    db.Model(blocks.MLPBlock(D), (8, 8, 1), M, embedding_dim=D)
  with pytest.raises(ValueError, match=r"block\(x, z\).*MLPTimeBlock"):
    dt.Model(blocks.MLPTimeBlock(M), (8, 8, 1), M)
  model = db.Model(blocks.MLPTimeBlock(M), (8, 8, 1), M, embedding_dim=D)  # outputs 10, not 16
  with pytest.raises(ValueError, match="d = 16.*outputs 10"):
    db.init(model, jax.random.key(0))
  with pytest.raises(ValueError, match="sequential"):
    RunConfig.create("diffusion_blocks", training="sequential")
