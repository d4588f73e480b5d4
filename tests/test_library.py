"""The library's shape: methods independent of each other, the seed outside compiled code,
any Flax block, and one flag per setting (the documentation's table included)."""

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

from noprop_jax import blocks, cli, config, core, dt, trainer
from noprop_jax import method as methods
from noprop_jax.config import RunConfig
from conftest import at_most_traced, build, stepper

ROOT = Path(__file__).resolve().parents[1]


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


LIBRARY_METHODS = {"dt", "ct", "fm", "backprop", "adjoint", "diffusion_blocks", "local"}
# The shared modules: the training loop, its settings, files and programs, and the core.
SHARED = ("trainer", "config", "cli", "workdir", "checkpoint", "programs", "autotune", "health",
          "sharding", "setting", "core")


def _shared_files():
  for name in SHARED:
    path = ROOT / "noprop_jax" / f"{name}.py"
    yield from sorted((ROOT / "noprop_jax" / name).glob("*.py")) if not path.exists() else [path]


def test_no_method_module_imports_another():
  assert LIBRARY_METHODS <= set(methods.names())
  for name in LIBRARY_METHODS:
    imported = _imported_modules(ROOT / "noprop_jax" / f"{name}.py")
    assert "core" in imported and "method" in imported, name  # the shared pieces, the contract
    others = imported & (LIBRARY_METHODS - {name})
    assert not others, f"noprop_jax/{name}.py imports the method module(s) {sorted(others)}"


def test_the_shared_modules_know_no_method_by_name():
  """The trainer, configuration, workdir, checkpoints, programs and core import no method
  and name none: what differs per method is in its record, read through the registry."""
  for path in _shared_files():
    tree = ast.parse(path.read_text())
    assert not _imported_modules(path) & LIBRARY_METHODS, path
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in LIBRARY_METHODS}
    assert not named, f"{path.relative_to(ROOT)} names the method(s) {sorted(named)}"
    assert not any(isinstance(n, ast.Name) and n.id == "hasattr" for n in ast.walk(tree)), path


def test_the_import_check_sees_every_import_form(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("import noprop_jax.ct\nfrom noprop_jax import fm, core\nfrom noprop_jax.dt import x\n"
                 "from . import backprop\nfrom .adjoint import y\ndef f():\n  from noprop_jax import blocks\n")
  assert _imported_modules(src) == {"ct", "fm", "core", "dt", "backprop", "adjoint", "blocks"}


# ----------------------------------------------------------------------------- the seed

def test_two_seeds_share_one_compiled_step(digits, traces, counted_method):
  """The seed lives in the state (its 'rng'), not in the compiled config: a second seed's
  state runs through the step compiled for the first, and trains differently."""
  # NoProp-DT's record again, with a train_step that fails the test when traced twice
  # (chex.assert_max_traces): the trainer builds this copy an epoch step of its own.
  name = counted_method("dt", "dt_two_seeds").name
  cfgs = [RunConfig.create(name, dataset="digits", T=2, block="mlp", hidden=16, batch_size=32,
                           seed=s) for s in (0, 1)]
  n = len(digits.train.labels)
  x, y = jax.device_put(digits.train.images), jax.device_put(digits.train.labels)
  (compute, model), (_, model1) = build(cfgs[0]), build(cfgs[1])
  assert model == model1 and hash(model) == hash(model1)  # static args: equal
  states = [trainer.init_state(c, model, jax.random.key(c.train.seed)) for c in cfgs]
  # The trainer's epoch step: built from the seed-0 config, run on both seeds' states.
  step = stepper(cfgs[0], model, compute, n)
  s0, m0 = step(jax.tree.map(jnp.copy, states[0]), x, y)  # traced (and compiled) here
  s1, m1 = step(jax.tree.map(jnp.copy, states[1]), x, y)  # a retrace fails the test
  assert float(m0["loss"]) != float(m1["loss"])  # other batches, noise and initial weights
  # The method's own jitted step likewise (dt.make_train_step: core.jit_step of train_step).
  step = core.jit_step(at_most_traced(dt.train_step), model, cfgs[0].train.optim, compute)
  xb, yb = x[:32], y[:32]
  step(jax.tree.map(jnp.copy, states[0]), xb, yb)
  step(jax.tree.map(jnp.copy, states[1]), xb, yb)
  # Neither init: the key is a traced argument. (The library's init is jitted already, so
  # chex cannot wrap it: `traces` sees every program traced.)
  traces.clear()
  trainer.init_state(cfgs[0], model, jax.random.key(2))
  assert traces == [], f"a third seed re-initialised by retracing: {traces}"


def test_the_trainer_builds_one_step_and_evaluator_per_setting(digits, method_registry):
  """A second run in the process with the same settings (another seed, a resumed run)
  gets the step and evaluator already traced; other settings and a replaced method step
  get their own; settings that cannot be hashed (a user's block with a list attribute)
  get a new one each time."""
  cfg = RunConfig.create(dataset="digits", T=2, block="mlp", hidden=16, batch_size=32)
  compute = trainer.resolve_compute(cfg)
  model = lambda c: build(c)[1]
  n = len(digits.train.labels)
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
  # A replaced method step: NoProp-DT's record with another train_step (a user's experiment).
  real = dt.train_step
  replaced = method_registry.register(dataclasses.replace(
      methods.get("dt"), name="dt_replaced_step", train_step=lambda *a: real(*a)))
  again = RunConfig.create(replaced.name, dataset="digits", T=2, block="mlp", hidden=16,
                           batch_size=32)
  assert model(again) == model(cfg)
  assert trainer.make_epoch_step(again, model(again), compute, n) is not step
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


def test_a_user_block_trains_with_noprop_dt_on_vectors(digits):
  x, y = _vectors(digits.train)
  x_test, y_test = _vectors(digits.test)
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


def test_the_feature_split_predicts_as_the_whole_block(digits):
  """dt.predict through features/from_features equals dt.predict calling whole blocks."""
  x, _ = _vectors(digits.test)
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
  for m in methods.names():
    names |= set(config.method_settings(m))
  for cls in (blocks.BlockConfig, config.DataConfig, config.TrainConfig):
    names |= {f.name for f in dataclasses.fields(cls)}
  return names


def test_every_setting_has_exactly_one_flag_and_every_flag_is_a_setting():
  settings = _settings()
  p = argparse.ArgumentParser()
  cli.add_flags(p)
  actions = [a for a in p._actions if a.dest != "help"]
  by_dest = {}
  for a in actions:
    by_dest.setdefault(a.dest, []).append(a.option_strings)
  assert set(by_dest) == settings | {"method_module"}  # and the module that registers a method
  for dest, options in by_dest.items():
    assert len(options) == 1 and len(options[0]) == 1, (dest, options)
  # No two concerns (or the run and a method) share a field name: a flag names one setting.
  groups = [set(config.method_settings(m)) for m in methods.names()]
  concerns = [{f.name for f in dataclasses.fields(c)}
              for c in (blocks.BlockConfig, config.DataConfig, config.TrainConfig)]
  method_names = set().union(*groups)
  for i, c in enumerate(concerns):
    assert not c & method_names, c & method_names
    for d in concerns[i + 1:]:
      assert not c & d, c & d
  flags = {options[0][0] for options in by_dest.values()}
  assert {f"--no-{f}" if f"--no-{f}" in flags else f"--{f}" for f in cli.settings_by_flag()} == flags - {"--method-module"}
  # experiments/train.py: the settings' flags and its own few.
  train_flags = {a.dest: a.option_strings for a in _train_parser()._actions if a.dest != "help"}
  own = {"workdir", "checkpoint_every", "keep_checkpoints", "no_progress", "distributed",
         "coordinator_address", "num_processes", "process_id", "heartbeat_timeout", "flag_table",
         "method_module"}
  assert own <= set(train_flags)
  assert set(train_flags) - own == settings
  for dest in settings:
    assert train_flags[dest] == by_dest[dest][0], dest


def test_flags_reach_their_settings():
  args = _train_parser().parse_args(
      ["--T", "3", "--eta", "0.5", "--block", "mlp", "--hidden", "16", "--lr", "0.01",
       "--dataset", "mnist", "--no-verify", "--mesh", "data=2", "--embedding", "learned"])
  cfg = cli.from_args(args)
  assert (cfg.method, cfg.T, cfg.model["eta"], cfg.model["embedding"]) == ("dt", 3, 0.5, "learned")
  assert (cfg.block.block, cfg.block.hidden, cfg.train.lr, cfg.train.mesh) == ("mlp", 16, 0.01, "data=2")
  assert (cfg.data.dataset, cfg.data.verify) == ("mnist", False)
  with pytest.raises(ValueError, match="not of ct"):
    cli.from_args(_train_parser().parse_args(["--method", "ct", "--T", "3"]))


def test_cli_page_flag_table_is_generated_from_the_settings():
  text = (ROOT / "docs" / "guide" / "cli.md").read_text()
  assert text.count("<!-- flags -->\n") == 1 and text.count("<!-- /flags -->") == 1
  section = text.split("<!-- flags -->\n", 1)[1].split("<!-- /flags -->", 1)[0]
  assert section.strip() == cli.flag_table().strip(), (
      "docs/guide/cli.md's flag table is out of date: run python experiments/render_results.py")
