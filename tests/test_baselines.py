"""The backprop and adjoint baselines, prototype embeddings and the radial classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax import adjoint, backprop, blocks, core, dt, prototypes, solvers, trainer
from noprop_jax.workdir import ConfigMismatchError, config_changes
from noprop_jax.config import RunConfig
from conftest import assert_trees, build, stepper


def _batch(digits, n=8):
  """The first n training digits, on the device."""
  return jnp.asarray(digits.train.images[:n]), jnp.asarray(digits.train.labels[:n])


def _norm(tree) -> float:
  return float(sum(jnp.sum(a.astype(jnp.float32) ** 2) for a in jax.tree.leaves(tree))) ** 0.5


# ----------------------------------------------------------------------------- backprop

@pytest.mark.parametrize("formulation", ["unroll", "vmap"])  # unrolled chain, lax.scan chain
def test_backprop_chain_is_eq_17_to_19_and_gradients_cross_blocks(formulation, digits):
  cfg = RunConfig.create("backprop", T=2, embedding="learned", embedding_dim=6, dropout=0.0)
  model = build(cfg)[1]
  X, Y = _batch(digits)
  compute = core.Compute(formulation).resolve(model.T)
  state = backprop.init(model, jax.random.key(0))
  params, stats = state["params"], state["stats"]
  assert set(stats) == {"batch_stats"}  # the paper's DT block has BatchNorm
  params = {**params, "w": jnp.array([0.3, -0.7]),
            "head": {"kernel": jax.random.normal(jax.random.key(1), (6, 10)),
                     "bias": jnp.zeros(10)}}
  z0 = jax.random.normal(jax.random.key(2), (8, 6))

  @jax.jit
  def by_hand(params):  # Eq. 17-19 written out block by block
    W, z = params["embed"], z0
    for t in range(2):
      p = jax.tree.map(lambda a: a[t], params["blocks"])
      s = jax.tree.map(lambda a: a[t], stats["batch_stats"])
      u_hat = jax.nn.softmax(model.block.apply({"params": p, "batch_stats": s}, X, z, train=False)) @ W
      a = jnp.tanh(params["w"][t])
      z = (1 - a) * z + a * u_hat
    return z @ params["head"]["kernel"] + params["head"]["bias"][None, :]

  got, updates = jax.jit(lambda p: backprop.forward(model, compute, p, stats, X, z0))(params)
  np.testing.assert_allclose(got, by_hand(params), rtol=1e-5, atol=1e-5)
  assert not jax.tree.leaves(updates)  # inference mode: the BatchNorm statistics stay

  # End-to-end: the first block's gradient is non-zero and depends on the later blocks,
  # unlike NoProp-DT's, where block t's loss never reaches another block (test_dt).
  def ce_of(params):
    logits, _ = backprop.forward(model, compute, params, stats, X, z0)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), Y])

  grad = jax.jit(jax.grad(ce_of))
  g = grad(params)
  first = lambda tree: jax.tree.map(lambda a: a[0], tree["blocks"])
  assert _norm(first(g)) > 1e-6
  assert _norm(jax.tree.map(lambda a: a[1], g["blocks"])) > 1e-6
  assert abs(float(g["w"][0])) > 0
  changed = {**params, "blocks": jax.tree.map(lambda a: a.at[1].multiply(1.5), params["blocks"])}
  g2 = grad(changed)
  assert _norm(jax.tree.map(jnp.subtract, first(g2), first(g))) > 1e-4 * _norm(first(g))


def _train_digits(digits, cfg, steps=48):
  """`steps` steps on 256 digits; returns (model, state, losses, mean-path accuracy on
  them, sampled runs' accuracies)."""
  compute, model = build(cfg)
  state = trainer.init_state(cfg, model, jax.random.key(0))
  step = stepper(cfg, model, compute, 256)
  x, y = _batch(digits, 256)
  losses = []
  for _ in range(steps):
    state, m = step(state, x, y)
    losses.append(float(m["loss"]))
  acc, runs = trainer.make_evaluator(cfg, model, compute, 256, 2)(state, x, y, jax.random.key(1))
  return model, state, losses, float(acc), runs


def test_backprop_trains_and_evaluates(digits):
  cfg = RunConfig.create("backprop", T=2, batch_size=32)
  model, state, losses, acc, runs = _train_digits(digits, cfg)
  assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1, losses
  assert acc > 0.4 and runs.shape == (2,), (acc, runs)  # chance is 0.1
  assert int(state["step"]) == 48
  # The evaluator's mean path is `predict`'s (z_0 = 0, inference-mode BatchNorm).
  x, y = _batch(digits, 256)
  pred = jnp.argmax(backprop.predict(model, state, x), -1)
  assert float(jnp.mean(pred == y)) == pytest.approx(acc, abs=1e-6)


@pytest.mark.parametrize("formulation", ["unroll", "scan"])
def test_backprop_rematerialised_per_block_has_the_same_gradient_in_less_memory(formulation,
                                                                                 digits):
  # remat: each block's activations are recomputed in the backward pass (jax.checkpoint),
  # the fair memory baseline for local learning. Same loss, same gradient; less memory
  # where the chain is a lax.scan (XLA:CPU schedules the unrolled chain's no lower).
  X, Y = _batch(digits, 1024)  # activations, not parameters, dominate the memory
  grads, temp = {}, {}
  for remat in (False, True):
    cfg = RunConfig.create("backprop", T=3, remat=remat, dropout=0.0)
    model = build(cfg)[1]
    compute = core.Compute(formulation).resolve(model.T)
    state = backprop.init(model, jax.random.key(0))
    ce = lambda params: backprop.loss(model, compute, params, state["stats"], X, Y,
                                      jax.random.key(1))[0]
    jaxpr = jax.make_jaxpr(jax.grad(ce))(state["params"]).pretty_print()
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == remat  # in the program when asked
    grads[remat] = jax.jit(jax.grad(ce))(state["params"])
    step = jax.jit(backprop.train_step, static_argnums=(0, 1, 2))
    temp[remat] = step.lower(model, core.Optim(), compute, state, X, Y).compile() \
        .memory_analysis().temp_size_in_bytes
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[False]))
  assert_trees(grads[True], grads[False], rtol=1e-4, atol=1e-5 * scale)
  if formulation == "scan":
    assert temp[True] < 0.5 * temp[False], temp


# ----------------------------------------------------------------------------- adjoint

def _mlp_problem(n_batch=16, d=8):
  k = jax.random.split(jax.random.key(0), 3)
  args = {"W1": 0.5 * jax.random.normal(k[0], (d, 32)), "W2": 0.5 * jax.random.normal(k[1], (32, d))}
  y0 = jax.random.normal(k[2], (n_batch, d))
  f = lambda t, y, p: jnp.tanh(y @ p["W1"] + t) @ p["W2"] - y
  return f, y0, args


def _loss(solve, f, n):
  return lambda y0, args: jnp.sum(jnp.sin(solve(f, y0, 0.0, 1.0, n, args)))


def test_adjoint_gradient_converges_to_backprop_through_the_solve_at_first_order():
  f, y0, args = _mlp_problem()
  steps, errors = [10, 20, 40, 80, 160], []
  for n in steps:
    v_adj, g_adj = jax.value_and_grad(_loss(solvers.euler_adjoint, f, n), (0, 1))(y0, args)
    v_bp, g_bp = jax.value_and_grad(_loss(solvers.euler, f, n), (0, 1))(y0, args)
    assert float(v_adj) == float(v_bp)  # the forward pass is the same Euler solve
    errors.append(max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                      for a, b in zip(jax.tree.leaves(g_adj), jax.tree.leaves(g_bp))))
  order = np.polyfit(np.log(1 / np.array(steps)), np.log(errors), 1)[0]
  assert 0.9 <= order <= 1.1, errors
  assert errors[-1] < 0.05


def test_adjoint_memory_is_flat_in_the_number_of_steps():
  f, y0, args = _mlp_problem()

  def temp_bytes(solve, n):
    compiled = jax.jit(jax.grad(_loss(solve, f, n), (0, 1))).lower(y0, args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  adj = [temp_bytes(solvers.euler_adjoint, n) for n in (10, 100, 1000)]
  through = [temp_bytes(solvers.euler, n) for n in (10, 1000)]
  assert adj[0] == adj[1] == adj[2], adj
  assert through[1] > 50 * through[0] and through[1] > 50 * adj[2], (through, adj)


def test_adjoint_model_gradients_match_backprop_through_the_solve(digits):
  cfg = RunConfig.create("adjoint", inference_steps=64, dropout=0.0)
  model = build(cfg)[1]
  X, Y = _batch(digits)
  assert isinstance(model.block, blocks.CTBlock) and core.has_split(model.block)
  state = adjoint.init(model, jax.random.key(0))
  params = {**state["params"], "head": {"kernel": jax.random.normal(jax.random.key(1), (10, 10)),
                                        "bias": jnp.zeros(10)}}
  grads = [jax.jit(jax.grad(lambda p, s=s: adjoint.loss(model, p, X, Y, jax.random.key(2), s)[0]))(
      params) for s in (solvers.euler_adjoint, solvers.euler)]
  flat_a, flat_b = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in grads)
  cos = float(flat_a @ flat_b / (jnp.linalg.norm(flat_a) * jnp.linalg.norm(flat_b)))
  assert cos > 0.99, cos
  # Every part of the block gets gradient: the conv tower through the features' cotangent.
  conv = grads[0]["block"]["image"]["Conv_0"]["kernel"]
  assert _norm(conv) > 0
  np.testing.assert_allclose(conv, grads[1]["block"]["image"]["Conv_0"]["kernel"],
                             rtol=0.1, atol=0.1 * float(jnp.max(jnp.abs(conv))))
  assert float(grads[0]["log_rate"]) != 0  # the learned rate trains too


def test_adjoint_trains(digits):
  cfg = RunConfig.create("adjoint", inference_steps=8, batch_size=32, lr=3e-3)
  _, _, losses, acc, _ = _train_digits(digits, cfg)
  assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, losses
  assert acc > 0.2, acc


def test_adjoint_refuses_another_embedding():
  model = adjoint.Model(blocks.MLPTimeBlock(10, hidden=8, depth=1), (4,), 10, inference_steps=2)
  with pytest.raises(ValueError, match="fixed one-hot embedding"):
    adjoint.init(model, jax.random.key(0), embed=jnp.zeros((10, 4)))


# ----------------------------------------------------------------------------- prototypes

def _brute_force_medoid(x):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  med = [np.median(np.delete(d[i], i)) for i in range(len(x))]
  return int(np.argmin(med))


def test_prototype_is_the_medoid_by_median_distance():
  # 1-D points 0, 1, 2.5, 3, 50, 60: median distances to the others 3, 2, 2.5, 3, 47.5,
  # 57.5, so the medoid is 1; by mean distance it would be 2.5 (109.5 / 5 against 112.5 / 5).
  pts = np.array([0.0, 1.0, 2.5, 3.0, 50.0, 60.0], np.float32)[:, None, None, None]
  assert prototypes.medoid_index(pts) == 1 == _brute_force_medoid(pts)
  rng = np.random.RandomState(0)
  for n, chunk in ((7, 2), (33, 8), (40, 512)):  # several chunks, a ragged last one, one chunk
    x = rng.rand(n, 4, 4, 1).astype(np.float32)
    assert prototypes.medoid_index(x, chunk=chunk) == _brute_force_medoid(x)


def test_prototype_embedding_rows_are_class_medoids_scaled_like_the_inputs():
  rng = np.random.RandomState(1)
  images = rng.randint(0, 256, (30, 3, 3, 1)).astype(np.uint8)
  labels = np.arange(30) % 3
  W = np.asarray(prototypes.prototype_embedding(images, labels, 3))
  assert W.shape == (3, 9)
  for c in range(3):
    members = images[labels == c]
    np.testing.assert_allclose(W[c], members[_brute_force_medoid(members)].ravel() / 255.0,
                               rtol=1e-6)
  with pytest.raises(ValueError, match="class 3 has no training images"):
    prototypes.prototype_embedding(images, labels, 4)


def test_prototype_init_needs_the_prototypes(digits):
  cfg = RunConfig.create("dt", embedding="prototype", T=2)
  model = build(cfg)[1]
  assert model.dim == 64 and model.block.prototype_shape == (8, 8, 1)
  with pytest.raises(ValueError, match="initialised from the training inputs"):
    dt.init(model, jax.random.key(0))
  with pytest.raises(ValueError, match=r"shape \(10, 64\)"):
    dt.init(model, jax.random.key(0), embed=jnp.zeros((10, 20)))
  W = prototypes.prototype_embedding(digits.train.images, digits.train.labels, 10)
  state = trainer.init_state(cfg, model, jax.random.key(0), digits.train.images, digits.train.labels)
  np.testing.assert_array_equal(state["shared"]["embed"], W)
  # The continuous-time methods take the same rows (their embedding is a parameter too).
  cfg_ct = RunConfig.create("ct", embedding="prototype")
  model_ct = build(cfg_ct)[1]
  state = trainer.init_state(cfg_ct, model_ct, jax.random.key(0), digits.train.images,
                             digits.train.labels)
  np.testing.assert_array_equal(state["params"]["embed"], W)


# ----------------------------------------------------------------------------- radial classifier

@pytest.mark.usefixtures("strict_dtypes")
def test_radial_probabilities_match_eq_15_16_and_sum_to_one():
  block = blocks.MLPBlock(10, hidden=8, depth=1)
  model = dt.Model(block, (64,), 10, embedding="learned", embedding_dim=5, classifier="radial",
                   radial_sigma=0.7)
  k = jax.random.split(jax.random.key(0), 4)
  shared = {"head": {"kernel": jax.random.normal(k[0], (5, 10)), "bias": jax.random.normal(k[1], (10,))},
            "embed": jax.random.normal(k[2], (10, 5))}
  z = jax.random.normal(k[3], (6, 5))
  p = np.asarray(jax.nn.softmax(dt.class_logits(model, shared, z)), np.float64)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)

  f = np.asarray(z, np.float64) @ np.asarray(shared["head"]["kernel"]) + np.asarray(shared["head"]["bias"])
  soft = np.exp(f - f.max(-1, keepdims=True))
  soft /= soft.sum(-1, keepdims=True)
  y_tilde = soft @ np.asarray(shared["embed"], np.float64)
  dist = ((y_tilde[:, None, :] - np.asarray(shared["embed"])[None]) ** 2).sum(-1)
  direct = np.exp(-dist / (2 * 0.7**2))
  direct /= direct.sum(-1, keepdims=True)
  np.testing.assert_allclose(p, direct, rtol=1e-5)
  # With the softmax head the same z gives other probabilities: the option is live.
  soft_model = dt.Model(block, (64,), 10, embedding="learned", embedding_dim=5)
  assert not np.allclose(jax.nn.softmax(dt.class_logits(soft_model, shared, z)), p)
  # The run config passes the setting through to the Model.
  cfg = RunConfig.create("dt", classifier="radial", radial_sigma=0.7, block="mlp")
  model = build(cfg, (64,))[1]
  assert model.classifier == "radial" and model.radial_sigma == 0.7


def test_adjoint_solver_steps_are_not_a_resumable_change(tmp_path):
  for method, resumable in (("ct", True), ("adjoint", False)):
    run = RunConfig.create(method)
    cfg = run.to_dict()
    # An omitted setting equals its explicit default.
    same = RunConfig.create(method, inference_steps=1000).to_dict()
    assert config_changes(tmp_path, cfg, same, run.resumable) == {}
    changed = RunConfig.create(method, inference_steps=100).to_dict()  # CT: inference only
    if resumable:
      assert config_changes(tmp_path, cfg, changed, run.resumable) == {"inference_steps": [1000, 100]}
    else:  # the adjoint trains with its solver steps
      with pytest.raises(ConfigMismatchError, match="inference_steps: saved 1000, now 100"):
        config_changes(tmp_path, cfg, changed, run.resumable)
