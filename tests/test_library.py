"""The library's shape: methods independent of each other, the seed outside compiled code,
any Flax block, and one flag per setting (the README's table included)."""

import argparse
import ast
import dataclasses
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noprop_jax import blocks, config, core, data, dt, trainer
from noprop_jax.config import METHODS, RunConfig
from conftest import stepper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = data.load("digits")


# ----------------------------------------------------------------------------- module layout

def _imported_modules(path: Path) -> set[str]:
  """The noprop_jax modules a source file imports, anywhere in it (absolute or relative)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("noprop_jax."):
          out.add(a.name.split(".")[1])
    elif isinstance(node, ast.ImportFrom):
      if node.level == 0 and node.module == "noprop_jax" or node.level == 1 and node.module is None:
        out.update(a.name for a in node.names)  # from noprop_jax import x / from . import x
      elif node.level == 0 and (node.module or "").startswith("noprop_jax."):
        out.add(node.module.split(".")[1])
      elif node.level == 1:
        out.add(node.module.split(".")[0])  # from .x import y
  return out


def test_no_method_module_imports_another():
  assert set(METHODS) == {"dt", "ct", "fm", "backprop", "adjoint", "diffusion_blocks", "local"}
  for name in METHODS:
    imported = _imported_modules(ROOT / "noprop_jax" / f"{name}.py")
    assert "core" in imported, name  # the shared pieces come from core
    others = imported & (set(METHODS) - {name})
    assert not others, f"noprop_jax/{name}.py imports the method module(s) {sorted(others)}"


def test_the_import_check_sees_every_import_form(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("import noprop_jax.ct\nfrom noprop_jax import fm, core\nfrom noprop_jax.dt import x\n"
                 "from . import backprop\nfrom .adjoint import y\ndef f():\n  from noprop_jax import blocks\n")
  assert _imported_modules(src) == {"ct", "fm", "core", "dt", "backprop", "adjoint", "blocks"}


# ----------------------------------------------------------------------------- the seed

def test_two_seeds_share_one_compiled_step(traces):
  """The seed lives in the state (its 'rng'), not in the compiled config: a second seed's
  state runs through the step compiled for the first, and trains differently."""
  cfgs = [RunConfig.create(dataset="digits", T=2, block="mlp", hidden=16, batch_size=32, seed=s)
          for s in (0, 1)]
  n = len(DIGITS.train.labels)
  x, y = jax.device_put(DIGITS.train.images), jax.device_put(DIGITS.train.labels)
  compute = trainer.resolve_compute(cfgs[0])
  models = [trainer.build_model(c, x.shape[1:], 10, compute) for c in cfgs]
  assert models[0] == models[1] and hash(models[0]) == hash(models[1])  # static args: equal
  states = [trainer.init_state(c, m, jax.random.key(c.train.seed)) for c, m in zip(cfgs, models)]
  # The trainer's epoch step: built from the seed-0 config, run on both seeds' states.
  trainer._epoch_step.cache_clear()  # (an earlier test may have built this step)
  step = stepper(cfgs[0], models[0], compute, n)
  traces.clear()
  s0, m0 = step(jax.tree.map(jnp.copy, states[0]), x, y)
  assert len(traces) >= 1
  traces.clear()
  s1, m1 = step(jax.tree.map(jnp.copy, states[1]), x, y)
  assert traces == [], f"a second seed retraced: {traces}"
  assert float(m0["loss"]) != float(m1["loss"])  # other batches, noise and initial weights
  # The method's own jitted step likewise.
  step = dt.make_train_step(models[0], cfgs[0].train.optim, compute)
  xb, yb = x[:32], y[:32]
  step(jax.tree.map(jnp.copy, states[0]), xb, yb)
  traces.clear()
  _, m1 = step(jax.tree.map(jnp.copy, states[1]), xb, yb)
  assert traces == [], f"a second seed retraced: {traces}"
  # Neither init: the key is a traced argument.
  trainer.init_state(cfgs[0], models[0], jax.random.key(2))
  assert traces == [], f"a third seed re-initialised by retracing: {traces}"


def test_the_trainer_builds_one_step_and_evaluator_per_setting(monkeypatch):
  """A second run in the process with the same settings (another seed, a resumed run)
  gets the step and evaluator already traced; other settings and a replaced method step
  get their own; settings that cannot be hashed (a user's block with a list attribute)
  get a new one each time."""
  cfg = RunConfig.create(dataset="digits", T=2, block="mlp", hidden=16, batch_size=32)
  compute = trainer.resolve_compute(cfg)
  model = lambda c: trainer.build_model(c, (8, 8, 1), 10, compute)
  n = len(DIGITS.train.labels)
  seed1 = RunConfig.create(dataset="digits", T=2, block="mlp", hidden=16, batch_size=32, seed=1)
  assert trainer.make_epoch_step(cfg, model(cfg), compute, n) is trainer.make_epoch_step(
      seed1, model(seed1), compute, n)
  assert trainer.make_evaluator(cfg, model(cfg), compute, n, 2) is trainer.make_evaluator(
      seed1, model(seed1), compute, n, 2)
  other = RunConfig.create(dataset="digits", T=2, block="mlp", hidden=16, batch_size=64)
  assert trainer.make_epoch_step(other, model(other), compute, n) is not trainer.make_epoch_step(
      cfg, model(cfg), compute, n)
  assert trainer.make_evaluator(cfg, model(cfg), compute, n, 3) is not trainer.make_evaluator(
      cfg, model(cfg), compute, n, 2)
  step = trainer.make_epoch_step(cfg, model(cfg), compute, n)
  real = dt.train_step
  monkeypatch.setattr(dt, "train_step", lambda *a: real(*a))  # a replaced method step
  assert trainer.make_epoch_step(cfg, model(cfg), compute, n) is not step
  listy = dt.Model(ListBlock(10, widths=[16]), (8, 8, 1), 10, T=2)
  with pytest.raises(TypeError):
    hash(listy)
  assert trainer.make_epoch_step(cfg, listy, compute, n) is not trainer.make_epoch_step(
      cfg, listy, compute, n)


class ListBlock(nn.Module):
  """A user's block with an unhashable (list) attribute."""

  num_classes: int
  widths: list

  @nn.compact
  def __call__(self, x, z):
    h = x.reshape(x.shape[0], -1)
    for w in self.widths:
      h = nn.relu(nn.Dense(w)(h))
    return nn.Dense(self.num_classes)(jnp.concatenate([h, z], -1))


# ----------------------------------------------------------------------------- any block

class UserMLP(nn.Module):
  """A block as a user would write it: no features/from_features split, no `train`."""

  num_classes: int

  @nn.compact
  def __call__(self, x, z):
    h = nn.relu(nn.Dense(64)(x))
    h = jnp.concatenate([h, nn.relu(nn.Dense(64)(z))], axis=-1)
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(64)(h)))


def _vectors(split):
  return split.images.reshape(len(split.labels), -1), split.labels


def test_a_user_block_trains_with_noprop_dt_on_vectors():
  x, y = _vectors(DIGITS.train)
  x_test, y_test = _vectors(DIGITS.test)
  assert x.shape[1:] == (64,)
  model = dt.Model(UserMLP(10), (64,), 10, T=3)
  assert not core.has_split(model.block)
  state = dt.init(model, jax.random.key(0))
  assert set(state["blocks"]) == {"params"}  # no BatchNorm: no other collection
  step = dt.make_train_step(model)
  B = 64
  for epoch in range(6):
    perm = np.random.RandomState(epoch).permutation(len(y))
    for i in range(len(y) // B):
      idx = perm[i * B:(i + 1) * B]
      state, m = step(state, x[idx], y[idx])
  assert np.isfinite(float(m["loss"]))
  assert dt.features(model, core.Compute(), state, x_test) is None  # whole blocks at inference
  logits = dt.predict(model, state, x_test)
  assert logits.shape == (len(y_test), 10)
  acc = float(np.mean(np.argmax(logits, -1) == y_test))
  assert acc > 0.7, acc  # chance is 0.1
  sampled = dt.predict(model, state, x_test, jax.random.key(1), mode="stochastic")
  assert float(np.mean(np.argmax(sampled, -1) == y_test)) > 0.5
  mean_correct, runs = dt.eval_counts(model, core.Compute(), state, x_test, y_test,
                                      jax.random.key(2), 2)
  assert int(mean_correct) == int(np.sum(np.argmax(logits, -1) == y_test)) and runs.shape == (2,)


class WholeMLP(nn.Module):
  """The provided MLPBlock behind a plain `__call__` (its parameters under 'inner')."""

  num_classes: int
  dropout: float

  @nn.compact
  def __call__(self, x, z, train: bool = False):
    return blocks.MLPBlock(self.num_classes, hidden=32, dropout=self.dropout, name="inner")(x, z, train)


def test_the_feature_split_predicts_as_the_whole_block():
  """dt.predict through features/from_features equals dt.predict calling whole blocks."""
  x, _ = _vectors(DIGITS.test)
  split = dt.Model(blocks.MLPBlock(10, hidden=32, dropout=0.3), (64,), 10, T=3)
  whole = dt.Model(WholeMLP(10, 0.3), (64,), 10, T=3)
  assert core.has_split(split.block) and not core.has_split(whole.block)
  state = dt.init(split, jax.random.key(0))
  state["shared"]["head"]["kernel"] = jax.random.normal(jax.random.key(9), (10, 10))  # not zero
  wrapped = {**state, "blocks": {"params": {"inner": state["blocks"]["params"]}}}
  # The wrapper's own init has exactly this layout.
  shapes = jax.eval_shape(lambda k: dt.init(whole, k), jax.random.key(0))["blocks"]
  assert jax.tree.structure(shapes) == jax.tree.structure(wrapped["blocks"])
  assert dt.features(split, core.Compute(), state, x).shape == (3, len(x), 32)
  for kw in (dict(), dict(key=jax.random.key(1), mode="stochastic")):
    a, b = dt.predict(split, state, x, **kw), dt.predict(whole, wrapped, x, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(np.std(np.asarray(a), axis=0).max()) > 1e-3  # logits depend on the input


# ----------------------------------------------------------------------------- flags

def _train_parser() -> argparse.ArgumentParser:
  spec = importlib.util.spec_from_file_location("train_script", ROOT / "experiments" / "train.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.parser()


def _settings() -> set[str]:
  """Every setting of a run: the method, each method's Model fields (less block and data
  shapes), and the fields of the block, data and train concerns."""
  names = {"method"}
  for m in METHODS:
    names |= set(config.method_settings(m))
  for cls in (blocks.BlockConfig, config.DataConfig, config.TrainConfig):
    names |= {f.name for f in dataclasses.fields(cls)}
  return names


def test_every_setting_has_exactly_one_flag_and_every_flag_is_a_setting():
  settings = _settings()
  p = argparse.ArgumentParser()
  config.add_flags(p)
  actions = [a for a in p._actions if a.dest != "help"]
  by_dest = {}
  for a in actions:
    by_dest.setdefault(a.dest, []).append(a.option_strings)
  assert set(by_dest) == settings
  for dest, options in by_dest.items():
    assert len(options) == 1 and len(options[0]) == 1, (dest, options)
  # No two concerns (or the run and a method) share a field name: a flag names one setting.
  groups = [set(config.method_settings(m)) for m in METHODS]
  concerns = [{f.name for f in dataclasses.fields(c)}
              for c in (blocks.BlockConfig, config.DataConfig, config.TrainConfig)]
  method_names = set().union(*groups)
  for i, c in enumerate(concerns):
    assert not c & method_names, c & method_names
    for d in concerns[i + 1:]:
      assert not c & d, c & d
  flags = {options[0][0] for options in by_dest.values()}
  assert {f"--no-{f}" if f"--no-{f}" in flags else f"--{f}" for f in config.settings_by_flag()} == flags
  # experiments/train.py: the settings' flags and its own few.
  train_flags = {a.dest: a.option_strings for a in _train_parser()._actions if a.dest != "help"}
  own = {"workdir", "checkpoint_every", "no_progress", "distributed", "flag_table"}
  assert own <= set(train_flags)
  assert set(train_flags) - own == settings
  for dest in settings:
    assert train_flags[dest] == by_dest[dest][0], dest


def test_flags_reach_their_settings():
  args = _train_parser().parse_args(
      ["--T", "3", "--eta", "0.5", "--block", "mlp", "--hidden", "16", "--lr", "0.01",
       "--dataset", "mnist", "--no-verify", "--mesh", "data=2", "--embedding", "learned"])
  cfg = config.from_args(args)
  assert (cfg.method, cfg.T, cfg.model["eta"], cfg.model["embedding"]) == ("dt", 3, 0.5, "learned")
  assert (cfg.block.block, cfg.block.hidden, cfg.train.lr, cfg.train.mesh) == ("mlp", 16, 0.01, "data=2")
  assert (cfg.data.dataset, cfg.data.verify) == ("mnist", False)
  with pytest.raises(ValueError, match="not of ct"):
    config.from_args(_train_parser().parse_args(["--method", "ct", "--T", "3"]))


def test_readme_flag_table_is_generated_from_the_settings():
  text = (ROOT / "README.md").read_text()
  assert text.count("<!-- flags -->\n") == 1 and text.count("<!-- /flags -->") == 1
  section = text.split("<!-- flags -->\n", 1)[1].split("<!-- /flags -->", 1)[0]
  assert section.strip() == config.flag_table().strip(), (
      "README.md's flag table is out of date: paste `python experiments/train.py --flag-table` "
      "between <!-- flags --> and <!-- /flags -->")
