"""NoProp-DT math and training steps on tiny configs (8x8 digits shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from noprop_jax import dt
from noprop_jax.config import Config

B = 16


def _cfg(**kw):
  kw.setdefault("T", 3)
  return Config.create(dataset="digits", batch_size=B, **kw)


def _batch(seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.uniform(kx, (B, 8, 8, 1)), jax.random.randint(ky, (B,), 0, 10)


def _blocks(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def test_noisy_label_marginal_uses_sqrt_alpha_bar():
  u = jnp.ones((200_000, 1))
  z = dt._noisy(u, jnp.float32(0.36), jax.random.key(0))
  assert float(z.mean()) == pytest.approx(0.6, abs=5e-3)  # sqrt(0.36), not 0.36
  assert float(z.var()) == pytest.approx(0.64, abs=5e-3)


def test_kl_term_matches_monte_carlo(strict_dtypes):
  cfg = _cfg(embedding="learned", embedding_dim=4)
  state = dt.init(cfg, jax.random.key(0))
  y = jnp.arange(10) % 10
  ab0 = float(dt.schedule(cfg).alpha_bar[0])
  _, parts = dt.head_loss(cfg, state["shared"], y, jax.random.key(1))
  u = np.asarray(state["shared"]["embed"], np.float64)[np.asarray(y)]
  rng = np.random.default_rng(0)
  z = np.sqrt(ab0) * u[None] + np.sqrt(1 - ab0) * rng.standard_normal((100_000, *u.shape))
  log_q = -0.5 * ((z - np.sqrt(ab0) * u) ** 2 / (1 - ab0) + np.log(2 * np.pi * (1 - ab0)))
  log_p = -0.5 * (z**2 + np.log(2 * np.pi))
  mc = (log_q - log_p).sum(-1).mean()
  assert float(parts["kl"]) == pytest.approx(mc, abs=3e-3)


def test_head_cross_entropy_is_on_logits_not_probabilities(strict_dtypes):
  cfg = _cfg()
  shared = {"head": {"kernel": 3.0 * jnp.eye(10), "bias": jnp.zeros(10)}}
  y = jnp.arange(10)
  _, parts = dt.head_loss(cfg, shared, y, jax.random.key(0))
  ab = float(dt.schedule(cfg).alpha_bar[-1])
  # z_T ~ sqrt(ab) e_y + small noise: CE ~ -log softmax(3 e_y)[y], single softmax
  expected = -jax.nn.log_softmax(3.0 * np.sqrt(ab) * jnp.eye(10))[0, 0]
  assert float(parts["ce"]) == pytest.approx(float(expected), abs=0.05)


def test_block_s_gets_no_gradient_from_block_t_loss(strict_dtypes):
  cfg = _cfg(T=2, embedding="learned", embedding_dim=6)
  state = dt.init(cfg, jax.random.key(0))
  x, y = _batch()

  @jax.jit
  def losses(params):
    blocks = {"params": params, "batch_stats": state["blocks"]["batch_stats"]}
    return dt.block_gradients(cfg, "vmap", blocks, state["shared"], x, y, jax.random.key(1))[0]

  jac = jax.jit(jax.jacrev(losses))(state["blocks"]["params"])  # leaves [T(loss), T(block), ...]
  for leaf in jax.tree.leaves(jac):
    norms = np.abs(np.asarray(leaf)).reshape(cfg.T, cfg.T, -1).sum(-1)
    off = norms[~np.eye(cfg.T, dtype=bool)]
    assert np.all(off == 0.0), "a block's loss reached another block's parameters"
  diag = sum(np.abs(np.asarray(l)).reshape(cfg.T, cfg.T, -1).sum(-1).diagonal()
             for l in jax.tree.leaves(jac))
  assert np.all(diag > 0)


@pytest.fixture(scope="module")
def parallel_step():
  cfg = _cfg(formulation="unroll")
  return cfg, dt.make_train_step(cfg)


def test_train_step_updates_each_block_from_its_own_data_only(parallel_step):
  """Perturbing block 0 changes block 0's update and nothing else."""
  cfg, step = parallel_step
  x, y = _batch()
  s1 = dt.init(cfg, jax.random.key(0))
  s2 = jax.tree.map(lambda a: a.copy(), s1)
  s2["blocks"]["params"] = jax.tree.map(lambda a: a.at[0].multiply(1.5),
                                        s2["blocks"]["params"])
  n1, _ = step(s1, x, y)
  n2, _ = step(s2, x, y)
  for i in range(1, cfg.T):
    for a, b in zip(jax.tree.leaves(_blocks(n1["blocks"], i)), jax.tree.leaves(_blocks(n2["blocks"], i))):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(_blocks(n1["opt_blocks"], i)),
                    jax.tree.leaves(_blocks(n2["opt_blocks"], i))):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(n1["shared"]["head"]["kernel"], n2["shared"]["head"]["kernel"])


def test_per_block_clipping_uses_each_blocks_own_norm():
  cfg = _cfg(grad_clip=1e-3)
  g = {"w": jnp.stack([jnp.full((3,), 10.0), jnp.full((3,), 1e-5)])}  # block 0 big, block 1 tiny
  opt = optax.clip_by_global_norm(cfg.grad_clip)
  out, _ = jax.vmap(opt.update)(g, jax.vmap(opt.init)(g))
  assert float(jnp.linalg.norm(out["w"][0])) == pytest.approx(1e-3, rel=1e-4)
  np.testing.assert_allclose(out["w"][1], g["w"][1])  # not scaled by block 0's norm


def test_formulations_compute_the_same_gradients():
  """vmap, unroll and scan differ in speed and memory only (up to float reordering)."""
  cfg = _cfg(T=2, embedding="learned", embedding_dim=6)
  state = dt.init(cfg, jax.random.key(0))
  x, y = _batch()
  out = {f: jax.jit(lambda b, s, f=f: dt.block_gradients(cfg, f, b, s, x, y, jax.random.key(1)))(
      state["blocks"], state["shared"]) for f in ("unroll", "vmap", "scan")}
  for f in ("vmap", "scan"):
    for a, b in zip(jax.tree.leaves(out["unroll"]), jax.tree.leaves(out[f])):
      # Biases of Dense layers followed by BatchNorm have zero gradient up to float
      # noise, hence the absolute floor.
      scale = float(np.abs(np.asarray(a)).max())
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * scale + 1e-5)


def test_sequential_step_touches_one_block():
  cfg = _cfg()
  step = jax.jit(lambda s, x, y, i: dt.sequential_step(cfg, s, x, y, i))
  x, y = _batch()
  s0 = dt.init(cfg, jax.random.key(0))
  s1, _ = step(s0, x, y, jnp.int32(1))
  for i in range(cfg.T):
    changed = any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(_blocks(s0["blocks"]["params"], i)),
        jax.tree.leaves(_blocks(s1["blocks"]["params"], i))))
    assert changed == (i == 1)
  assert int(s1["opt_blocks"][1][0].count[1]) == 1  # block 1's own Adam count
  assert int(s1["opt_blocks"][1][0].count[0]) == 0


def test_predict_modes_and_shapes(strict_dtypes):
  cfg = _cfg()
  state = dt.init(cfg, jax.random.key(0))
  state["shared"]["head"]["kernel"] = jax.random.normal(jax.random.key(9), (10, 10))  # not zero
  x, _ = _batch()
  mean1 = dt.predict(cfg, state, x)
  mean2 = dt.predict(cfg, state, x)
  assert mean1.shape == (B, 10) and mean1.dtype == jnp.float32
  np.testing.assert_array_equal(mean1, mean2)  # the mean path is deterministic
  s1 = dt.predict(cfg, state, x, jax.random.key(0), mode="stochastic")
  s2 = dt.predict(cfg, state, x, jax.random.key(1), mode="stochastic")
  assert not np.allclose(s1, s2)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    dt.predict(cfg, state, x, mode="stochastic")
  with pytest.raises(ValueError, match=r"shape \[batch, 8, 8, 1\]"):
    dt.predict(cfg, state, jnp.zeros((4, 28, 28, 1)))
  with pytest.raises(ValueError, match="unknown inference mode"):
    dt.predict(cfg, state, x, mode="greedy")


def test_mean_path_chain_matches_explicit_update(strict_dtypes):
  """The scan applies z_t = a_t u_hat + b_t z_{t-1} + sqrt(c_t) eps_t block by block."""
  cfg = _cfg()
  state = dt.init(cfg, jax.random.key(3))
  x, _ = _batch()
  feats = dt.image_features(cfg, state, x)
  eps = jax.random.normal(jax.random.key(4), (cfg.T, B, 10))
  z0 = jax.random.normal(jax.random.key(5), (B, 10))
  got = dt.denoise_chain(cfg, state, feats, z0, eps)
  sched, model = dt.schedule(cfg), dt.make_model(cfg)
  z = z0
  for i in range(cfg.T):
    v = {"params": _blocks(state["blocks"]["params"], i),
         "batch_stats": _blocks(state["blocks"]["batch_stats"], i)}
    u_hat = jax.nn.softmax(model.apply(v, x, z, train=False)) @ jnp.eye(10)
    z = sched.a[i] * u_hat + sched.b[i] * z + jnp.sqrt(sched.c[i]) * eps[i]
  np.testing.assert_allclose(got, z, rtol=1e-4, atol=1e-5)


def test_loss_function_is_the_step_objective(parallel_step):
  cfg, step = parallel_step
  x, y = _batch()
  state = dt.init(cfg, jax.random.key(0))
  value = dt.loss(cfg, state, x, y, jax.random.key(0))
  assert value.shape == () and np.isfinite(float(value)) and float(value) > 0
  # Eq. 8: CE + KL + (T/2) eta E_t[dSNR(t) mse_t], the expectation as the mean over t
  k_blocks, k_head = jax.random.split(jax.random.key(0))

  @jax.jit
  def block_mses(blocks):  # each block's own loss term, by the same keys as dt.loss draws
    return jnp.stack([
        dt.block_loss(cfg, _blocks(blocks["params"], i), _blocks(blocks["batch_stats"], i),
                      state["shared"], x, y, i, jax.random.fold_in(k_blocks, i))[1][1]["mse"]
        for i in range(cfg.T)])

  mse = block_mses(state["blocks"])
  head, _ = dt.head_loss(cfg, state["shared"], y, k_head)
  sched = dt.schedule(cfg)
  eq8 = float(head) + 0.5 * cfg.T * cfg.eta * float(jnp.mean(jnp.diff(sched.snr) * mse))
  assert float(value) == pytest.approx(eq8, rel=1e-5)
