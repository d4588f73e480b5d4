"""NoProp-DT math and training steps on tiny configs (8x8 digits shapes, the paper's block)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees, make_model
from noprop_jax import core, dt
from noprop_jax.core import Compute, Optim

B = 16
SHAPE = (8, 8, 1)
# Models: `make_model("dt", T=..., formulation=...)`, the paper's block at the digits' 8x8x1
# (SAME padding), built as the trainer builds it: formulation "unroll" runs the blocks one
# by one, "vmap" batches them and "scan" loops over them (each with its CPU convolution).


def _batch(seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.uniform(kx, (B, *SHAPE)), jax.random.randint(ky, (B,), 0, 10)


def _blocks(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def _reordering_atol(ref) -> float:
  """A leaf's tolerance for "equal up to float reordering": 1e-4 of its scale plus a floor,
  as biases of Dense layers followed by BatchNorm have zero gradient up to float noise."""
  return 1e-4 * float(np.abs(np.asarray(ref)).max()) + 1e-5


def test_noisy_label_marginal_uses_sqrt_alpha_bar():
  u = jnp.ones((200_000, 1))
  z = core.noisy(u, jnp.float32(0.36), jnp.float32(0.64), jax.random.key(0))
  assert float(z.mean()) == pytest.approx(0.6, abs=5e-3)  # sqrt(0.36), not 0.36
  assert float(z.var()) == pytest.approx(0.64, abs=5e-3)


def test_kl_term_matches_monte_carlo(strict_dtypes):
  # The head's terms do not involve the blocks: a small MLP block initialises fast.
  model = make_model("dt", T=3, block="mlp", hidden=8, dropout=0.0, embedding="learned",
                     embedding_dim=4)
  state = dt.init(model, jax.random.key(0))
  y = jnp.arange(10) % 10
  ab0 = float(model.schedule.alpha_bar[0])
  _, (_, kl) = dt.head_terms(model, state["shared"], y, jax.random.key(1))
  u = np.asarray(state["shared"]["embed"], np.float64)[np.asarray(y)]
  rng = np.random.default_rng(0)
  z = np.sqrt(ab0) * u[None] + np.sqrt(1 - ab0) * rng.standard_normal((100_000, *u.shape))
  log_q = -0.5 * ((z - np.sqrt(ab0) * u) ** 2 / (1 - ab0) + np.log(2 * np.pi * (1 - ab0)))
  log_p = -0.5 * (z**2 + np.log(2 * np.pi))
  mc = (log_q - log_p).sum(-1).mean()
  assert float(kl) == pytest.approx(mc, abs=3e-3)


def test_head_cross_entropy_is_on_logits_not_probabilities(strict_dtypes):
  model = make_model("dt", T=3, formulation="unroll")
  shared = {"head": {"kernel": 3.0 * jnp.eye(10), "bias": jnp.zeros(10)}}
  y = jnp.arange(10)
  _, (ce, _) = dt.head_terms(model, shared, y, jax.random.key(0))
  ab = float(model.schedule.alpha_bar[-1])
  # z_T ~ sqrt(ab) e_y + small noise: CE ~ -log softmax(3 e_y)[y], single softmax
  expected = -jax.nn.log_softmax(3.0 * np.sqrt(ab) * jnp.eye(10))[0, 0]
  assert float(ce) == pytest.approx(float(expected), abs=0.05)


def test_block_s_gets_no_gradient_from_block_t_loss(strict_dtypes):
  """Each block's denoising term, mapped over the stacked blocks as the CPU step maps them
  (unrolled in one program), depends on that block's parameters only."""
  model = make_model("dt", T=2, formulation="vmap", embedding="learned", embedding_dim=6)
  state = dt.init(model, jax.random.key(0))
  x, y = _batch()
  W = state["shared"]["embed"]
  compute = Compute("unroll").resolve(model.T)

  @jax.jit
  def losses(params):
    def one(inp):
      variables, t = inp
      return dt.denoise_error(model, variables, W, x, y, t, jax.random.fold_in(jax.random.key(1), t))[0]
    blocks_ = {**state["blocks"], "params": params}
    return core.map_blocks(one, (blocks_, jnp.arange(1, model.T + 1)), compute)

  jac = jax.jit(jax.jacrev(losses))(state["blocks"]["params"])  # leaves [T(loss), T(block), ...]
  for leaf in jax.tree.leaves(jac):
    norms = np.abs(np.asarray(leaf)).reshape(model.T, model.T, -1).sum(-1)
    off = norms[~np.eye(model.T, dtype=bool)]
    assert np.all(off == 0.0), "a block's loss reached another block's parameters"
  diag = sum(np.abs(np.asarray(l)).reshape(model.T, model.T, -1).sum(-1).diagonal()
             for l in jax.tree.leaves(jac))
  assert np.all(diag > 0)


@pytest.fixture(scope="module")
def parallel_step():
  model = make_model("dt", T=3, formulation="unroll")
  return model, dt.make_train_step(model, Optim(), Compute("unroll"))


def test_train_step_updates_each_block_from_its_own_data_only(parallel_step):
  """Perturbing block 0 changes block 0's update and nothing else."""
  model, step = parallel_step
  x, y = _batch()
  s1 = dt.init(model, jax.random.key(0))
  s2 = jax.tree.map(lambda a: a.copy(), s1)  # the step donates its state
  s2["blocks"]["params"] = jax.tree.map(lambda a: a.at[0].multiply(1.5), s2["blocks"]["params"])
  n1, _ = step(s1, x, y)
  n2, _ = step(s2, x, y)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(_blocks(n1["blocks"], 0)), jax.tree.leaves(_blocks(n2["blocks"], 0))))
  for i in range(1, model.T):
    assert_trees(_blocks(n2["blocks"], i), _blocks(n1["blocks"], i), what=f"block {i}")
    assert_trees(_blocks(n2["opt_blocks"], i), _blocks(n1["opt_blocks"], i),
                 what=f"block {i}'s optimizer")
  np.testing.assert_array_equal(n1["shared"]["head"]["kernel"], n2["shared"]["head"]["kernel"])


def test_per_block_clipping_uses_each_blocks_own_norm():
  """The blocks' optimizer as the step applies it (AdamW vmapped over the stacked blocks):
  each block is clipped by its own gradient norm. Adam's first moment after one step is
  (1 - b1) times the clipped gradient."""
  opt = core.adamw(Optim(grad_clip=1e-3))
  g = {"w": jnp.stack([jnp.full((3,), 10.0), jnp.full((3,), 1e-5)])}  # block 0 big, block 1 tiny
  params = jax.tree.map(jnp.zeros_like, g)
  _, state = jax.vmap(opt.update)(g, jax.vmap(opt.init)(params), params)
  clipped = optax.tree_utils.tree_get(state, "mu")["w"] / 0.1
  assert float(jnp.linalg.norm(clipped[0])) == pytest.approx(1e-3, rel=1e-4)
  np.testing.assert_allclose(clipped[1], g["w"][1], rtol=1e-5)  # not scaled by block 0's norm


@pytest.fixture(scope="module")
def loss_gradient():
  """jax.grad of `dt.loss` (Eq. 8) in the blocks' parameters and `shared`, at a state
  whose step is not 0, with the key the training step draws (`core.step_key`)."""
  # A learned embedding: the blocks' terms reach `shared` too (one-hot: only the head's).
  model = make_model("dt", T=2, formulation="vmap", embedding="learned", embedding_dim=6)
  state = {**dt.init(model, jax.random.key(0)), "step": jnp.int32(7)}
  x, y = _batch()

  @jax.jit
  def grad(params, shared, key):
    f = lambda p, s: dt.loss(model, {**state["blocks"], "params": p}, s, x, y, key)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, shared)

  return model, state, x, y, partial(grad, state["blocks"]["params"], state["shared"])


@pytest.mark.parametrize("formulation", ["unroll", "vmap", "scan"])
def test_step_gradient_is_the_gradient_of_the_loss(loss_gradient, formulation):
  """`dt.gradients` (what `train_step` applies; block t's from its own term only) equals
  jax.grad of the whole objective `dt.loss`, under every formulation."""
  model, state, x, y, grad = loss_gradient
  compute = Compute(formulation).resolve(model.T)
  g_blocks, g_shared, aux = jax.jit(partial(dt.gradients, model, compute))(state, x, y)
  (value, metrics), (want_blocks, want_shared) = grad(core.step_key(state))
  assert_trees(g_blocks, want_blocks, atol=_reordering_atol, what="blocks")
  assert_trees(g_shared, want_shared, atol=_reordering_atol, what="shared")
  assert set(g_shared) == {"head", "embed"}
  assert float(jnp.abs(g_shared["embed"]).max()) > 0
  # The same objective's value and parts.
  assert value.shape == () and np.isfinite(float(value))
  # ... CE + KL + the denoising term, each positive; the step's head term is CE + KL.
  assert float(metrics["ce"] + metrics["kl"] + metrics["denoise"]) == pytest.approx(
      float(value), rel=1e-6)
  assert all(float(metrics[k]) > 0 for k in ("ce", "kl", "denoise")), metrics
  assert float(aux["head_loss"]) == pytest.approx(float(aux["ce"] + aux["kl"]), rel=1e-6)
  assert float(aux["kl"]) == pytest.approx(float(metrics["kl"]), rel=1e-6)
  assert float(aux["block_loss"].sum() + aux["head_loss"]) == pytest.approx(float(value), rel=1e-5)
  assert float(aux["block_loss"].sum()) == pytest.approx(float(metrics["denoise"]), rel=1e-5)
  assert float(aux["ce"]) == pytest.approx(float(metrics["ce"]), rel=1e-6)
  # Eq. 8's denoising term: (T / 2) eta E_t[dSNR(t) mse_t], the expectation as the mean over t.
  eq8 = 0.5 * model.T * model.eta * jnp.mean(model.schedule.dsnr * aux["block_mse"])
  assert float(metrics["denoise"]) == pytest.approx(float(eq8), rel=1e-5)
  # Each block's term in the step is its error times the one weight `loss` uses.
  weight = dt.denoise_weight(model, jnp.arange(1, model.T + 1), model.T)
  np.testing.assert_allclose(aux["block_loss"], weight * aux["block_mse"], rtol=1e-6)
  if formulation == "unroll":  # (one formulation: compiling a step costs as much again)
    # The step reports the same loss: it draws its noise from core.step_key(state).
    _, m = jax.jit(partial(dt.train_step, model, Optim(), compute))(state, x, y)
    assert float(m["loss"]) == pytest.approx(float(value), rel=1e-5)
  # ... and the match is not an accident of the key: another key, another gradient.
  _, (other, _) = grad(jax.random.key(123))
  assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(want_blocks)[0])


def test_denoise_weight_is_eq8s_coefficient():
  """(T / 2) eta (SNR(t) - SNR(t-1)) / n_blocks: all T blocks give E_t exactly (the weights'
  mean over t is Eq. 8's coefficient); one block (Algorithm 1) carries T times its share."""
  model = make_model("dt", T=4, formulation="unroll", eta=0.3)
  t = jnp.arange(1, model.T + 1)
  dsnr = np.asarray(model.schedule.dsnr, np.float64)
  np.testing.assert_allclose(dt.denoise_weight(model, t, model.T), 0.5 * 0.3 * dsnr, rtol=1e-5)
  np.testing.assert_allclose(dt.denoise_weight(model, t, 1), 0.5 * 4 * 0.3 * dsnr, rtol=1e-5)
  assert float(dt.denoise_weight(model, jnp.int32(2), model.T)) == pytest.approx(
      0.5 * 0.3 * dsnr[1], rel=1e-5)  # a traced t, as the step passes it


def test_sequential_step_touches_one_block():
  model = make_model("dt", T=3, formulation="unroll")
  compute = Compute("unroll").resolve(model.T)
  step = jax.jit(lambda s, x, y, i: dt.sequential_step(model, Optim(), compute, s, x, y, i))
  x, y = _batch()
  s0 = dt.init(model, jax.random.key(0))
  s1, _ = step(s0, x, y, jnp.int32(1))
  for i in range(model.T):
    changed = any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(_blocks(s0["blocks"]["params"], i)),
        jax.tree.leaves(_blocks(s1["blocks"]["params"], i))))
    assert changed == (i == 1)
  count = optax.tree_utils.tree_get(s1["opt_blocks"], "count")  # each block's own Adam count
  np.testing.assert_array_equal(count, [0, 1, 0])
  assert int(s1["step"]) == 1


def test_predict_modes_and_shapes(strict_dtypes):
  model = make_model("dt", T=3, formulation="unroll")
  state = dt.init(model, jax.random.key(0))
  state["shared"]["head"]["kernel"] = jax.random.normal(jax.random.key(9), (10, 10))  # not zero
  x, _ = _batch()
  mean1 = dt.predict(model, state, x)
  mean2 = dt.predict(model, state, x)
  assert mean1.shape == (B, 10) and mean1.dtype == jnp.float32
  np.testing.assert_array_equal(mean1, mean2)  # the mean path is deterministic
  s1 = dt.predict(model, state, x, jax.random.key(0), mode="stochastic")
  s2 = dt.predict(model, state, x, jax.random.key(1), mode="stochastic")
  assert s1.shape == (B, 10) and not np.allclose(s1, s2)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    dt.predict(model, state, x, mode="stochastic")
  with pytest.raises(ValueError, match=r"shape \[batch, 8, 8, 1\]"):
    dt.predict(model, state, jnp.zeros((4, 28, 28, 1)))
  with pytest.raises(ValueError, match="unknown inference mode"):
    dt.predict(model, state, x, mode="greedy")


def test_predictions_are_the_same_however_the_blocks_are_mapped(strict_dtypes):
  """Inference maps the blocks as the training step does (all T unrolled or vmapped, or one
  at a time in a scan), each with the convolution its model was built with: the same
  logits, mean path and sampled, up to float reordering."""
  models = {f: make_model("dt", T=3, formulation=f) for f in ("unroll", "vmap", "scan")}
  assert core.chain_compute(3, Compute("scan")) == Compute("scan", blocks_per_step=1)
  state = dt.init(models["unroll"], jax.random.key(0))
  state["shared"]["head"]["kernel"] = jax.random.normal(jax.random.key(9), (10, 10))  # not zero
  x, _ = _batch()
  for mode, key in (("mean", None), ("stochastic", jax.random.key(1))):
    want = dt.predict(models["unroll"], state, x, key, mode, compute=Compute("unroll"))
    for f in ("vmap", "scan"):
      got = dt.predict(models[f], state, x, key, mode, compute=Compute(f))
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{f} {mode}")


def test_mean_path_chain_matches_explicit_update(strict_dtypes):
  """The scan applies z_t = a_t u_hat + b_t z_{t-1} + sqrt(c_t) eps_t block by block, on
  the features computed once per input."""
  model = make_model("dt", T=3, formulation="unroll")
  state = dt.init(model, jax.random.key(3))
  x, _ = _batch()
  feats = dt.features(model, Compute("unroll").resolve(model.T), state, x)
  assert feats.shape[:2] == (model.T, B)
  eps = jax.random.normal(jax.random.key(4), (model.T, B, 10))
  z0 = jax.random.normal(jax.random.key(5), (B, 10))
  got = dt.denoise_chain(model, state, x, feats, z0, eps)
  sched = model.schedule
  z = z0
  for i in range(model.T):
    v = _blocks(state["blocks"], i)
    u_hat = jax.nn.softmax(model.block.apply(v, x, z, train=False)) @ jnp.eye(10)
    z = sched.a[i] * u_hat + sched.b[i] * z + jnp.sqrt(sched.c[i]) * eps[i]
  np.testing.assert_allclose(got, z, rtol=1e-4, atol=1e-5)
