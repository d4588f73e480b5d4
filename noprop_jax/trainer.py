"""The training loop behind experiments/train.py: the data on the device, one jitted step
per batch, evaluation, checkpoints and exact resume, for any method.

`train` reads top to bottom: `setup` builds everything once, `run_epoch` trains one
epoch, `evaluate` measures, `summarize` writes the summary. What differs per method
comes from the method's module (`config.METHODS`): its Model, steps, evaluation and
banner.
"""

import contextlib
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from noprop_jax import blocks, core, host_memory, sharding
from noprop_jax import workdir as wd
from noprop_jax.checkpoint import Checkpointer
from noprop_jax.config import METHODS, RunConfig
from noprop_jax.data import Dataset, load
from noprop_jax.prototypes import prototype_embedding

TRAIN_EVAL_SIZE = 10_000  # train_accuracy is measured on a fixed subset of this many


class NonFiniteLossError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------- building blocks

def build_model(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int,
                compute: core.Compute, backend: str | None = None):
  """The method's Model for data of this shape, with the configured block. `compute` is
  resolved; with `backend` (default: JAX's) it picks the paper block's convolution."""
  method = METHODS[cfg.method]
  looped = bool(method.STACKED) and (compute.formulation != "unroll"
                                     or compute.blocks_per_step < cfg.T)
  # The block's output size: the classes' logits, or another size the method asks for.
  out = method.block_outputs(cfg.model, num_classes) if hasattr(method, "block_outputs") else num_classes
  block = blocks.make(cfg.block, method.TIME_CONDITIONED, out, tuple(input_shape),
                      prototype=cfg.model.get("embedding") == "prototype", looped=looped,
                      backend=backend)
  return method.Model(block, tuple(input_shape), num_classes, **cfg.model)


def resolve_compute(cfg: RunConfig, backend: str | None = None) -> core.Compute:
  """cfg's execution settings resolved for `backend` (default: JAX's)."""
  auto = getattr(METHODS[cfg.method], "AUTO_FORMULATION", None)
  return cfg.train.compute.resolve(cfg.T, cfg.train.mesh_shape["blocks"], auto, backend)


def init_state(cfg: RunConfig, model, key: jax.Array, inputs=None, labels=None):
  """The method's initial state; prototype embeddings come from the training split
  (without it, zeros: a template for restoring a checkpoint)."""
  embed = None
  if cfg.model.get("embedding") == "prototype":
    embed = (jnp.zeros((model.num_classes, model.dim), jnp.float32) if inputs is None
             else prototype_embedding(inputs, labels, model.num_classes))
  return METHODS[cfg.method].init(model, key, cfg.train.optim, embed=embed)


@functools.partial(jax.jit, static_argnums=(2, 3))
def batch_order(rng: jax.Array, step: jax.Array, n_train: int, per_pass: int) -> jax.Array:
  """The order [n_train] in which pass p = step // per_pass visits the training split: a
  permutation keyed on (the run's key `rng`, p), so a run resumed at any step sees exactly
  the batches it would have seen. Computed once per pass; each step slices its batch."""
  p = step // per_pass
  return jax.random.permutation(jax.random.fold_in(core.stream({"rng": rng}, 2), p), n_train)


def make_epoch_step(cfg: RunConfig, model, compute: core.Compute, n_train: int) -> Callable:
  """Jitted `(state, inputs, labels, order) -> (state, metrics)` on the whole training split.

  The batch is cut on the device: step i of a pass takes the i-th batch of `order`, the
  pass's `batch_order`. Sequential training (Algorithm 1) updates block p % T during
  pass p. With a mesh, the batch is split on 'data' and the method's stacked state on
  'blocks'.

  One per setting in a process: another run with the same settings (another seed, a
  resumed run, a notebook's next call) reuses the step already traced and compiled.
  """
  tr, method = cfg.train, METHODS[cfg.method]
  # The method's step functions are part of the key: one replaced (a test's monkeypatch,
  # a user's experiment) gets a step of its own.
  steps = (method.train_step, getattr(method, "sequential_step", None))
  return _once_per_setting(_epoch_step, cfg.method, steps, tr.batch_size, tr.optim, tr.mesh,
                           tr.training, cfg.T, model, compute, n_train)


def _once_per_setting(build: Callable, *settings) -> Callable:
  """`build(*settings)`, cached on the settings; built anew where they cannot be hashed
  (a user's block with, say, a list attribute)."""
  try:
    hash(settings)
  except TypeError:
    return build.__wrapped__(*settings)
  return build(*settings)


@functools.lru_cache(maxsize=16)
def _epoch_step(method_name: str, steps: tuple[Callable, Callable | None], B: int,
                optim: core.Optim, mesh_spec: str, training: str, T: int, model,
                compute: core.Compute, n_train: int) -> Callable:
  """`make_epoch_step` from the settings it reads, all hashable: the cache's key."""
  method, (train_step, sequential_step), per_pass = METHODS[method_name], steps, n_train // B
  mesh = sharding.make_mesh(mesh_spec)

  def step(state, inputs, labels, order):
    with _mesh_context(mesh):
      return _step(state, inputs, labels, order)

  def _step(state, inputs, labels, order):
    p, i = jnp.divmod(state["step"], per_pass)
    idx = lax.dynamic_slice_in_dim(order, i * B, B)
    x, y = inputs[idx], labels[idx]
    if mesh is not None:
      x, y = sharding.constrain((x, y), sharding.batch_sharding(mesh))
    if training == "sequential":
      state, m = sequential_step(model, optim, compute, state, x, y, p % T)
    else:
      state, m = train_step(model, optim, compute, state, x, y)
    if mesh is not None:
      state = sharding.constrain(state, sharding.state_shardings(method.STACKED, mesh, state))
      # The few metric values on every device: each host reads them (to log, to check the
      # loss), and a host can only read what its own devices hold.
      m = sharding.constrain(m, sharding.replicated(mesh))
    return state, m

  return jax.jit(step, donate_argnums=0)


def _mesh_context(mesh):
  """The mesh as JAX's context while a step is traced: the parts that split the work by
  hand (`sharding.over_blocks`, `sharding.per_example`) read it there."""
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


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
  auto = (METHODS[cfg.method].STACKED and cfg.train.training == "parallel"
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


EVAL_BATCH = 500  # evaluation's largest batch; smaller where it does not fit in memory


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


def make_evaluator(cfg: RunConfig, model, compute: core.Compute, n: int, runs: int,
                   batch: int = EVAL_BATCH) -> Callable:
  """Jitted `(state, inputs, labels, key) -> (mean-path accuracy, [runs] sampled accuracies)`
  over a whole split: `lax.map` over fixed-size batches of the method's `eval_counts`.
  One per setting in a process, as `make_epoch_step`."""
  return _once_per_setting(_evaluator, METHODS[cfg.method].eval_counts, cfg.train.mesh, model,
                           compute, n, runs, min(batch, n))


@functools.lru_cache(maxsize=16)
def _evaluator(counts: Callable, mesh_spec: str, model, compute: core.Compute, n: int, runs: int,
               batch: int) -> Callable:
  nb = math.ceil(n / batch)
  mesh = sharding.make_mesh(mesh_spec)

  def evaluate(state, inputs, labels, key):
    with _mesh_context(mesh):
      return _evaluate(state, inputs, labels, key)

  def _evaluate(state, inputs, labels, key):
    pad = nb * batch - n
    xs = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1)).reshape(nb, batch, *inputs.shape[1:])
    ys = jnp.pad(labels, (0, pad), constant_values=-1).reshape(nb, batch)
    def one(a):
      if mesh is not None and batch % mesh.shape["data"] == 0:  # each device its rows
        a = (*sharding.constrain(a[:2], sharding.batch_sharding(mesh)), a[2])
      return counts(model, compute, state, *a, runs)

    c_mean, c_stoch = lax.map(one, (xs, ys, jax.random.split(key, nb)))
    out = c_mean.sum() / n, c_stoch.sum(0) / n
    # On every device, so that every host can read them (as the step's metrics).
    return out if mesh is None else sharding.constrain(out, sharding.replicated(mesh))

  return jax.jit(evaluate)


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Run:
  """Everything `setup` builds once."""

  cfg: RunConfig
  ds: Dataset
  model: Any
  compute: core.Compute
  step_fn: Callable
  eval_test: Callable
  eval_train: Callable
  arrays: dict  # train / test / train-subset inputs and labels, on the device(s)
  per_epoch: int
  per_pass: int  # steps per pass over the training split (per_epoch / T in sequential training)
  all_finite: Callable  # state -> whether every float in it is finite (`_check_health`)
  compile_seconds: float
  ckpt: Checkpointer
  start: int
  meta: dict
  held: tuple | None = None  # (step, state copy, meta) waiting to be checkpointed (`_hold`)


def setup(cfg: RunConfig, workdir: Path, ds: Dataset, print_fn,
          primary: bool = True) -> tuple[Run, Any]:
  """Check the data, build the model, restore (the newest intact checkpoint) or initialise
  the state, compile the step."""
  tr, method = cfg.train, METHODS[cfg.method]
  for split in (ds.train, ds.test):
    if split.images.shape[1:] != ds.train.images.shape[1:]:
      raise ValueError(f"train and test inputs differ in shape: {ds.train.images.shape[1:]} "
                       f"and {split.images.shape[1:]}")
  n_train = len(ds.train.labels)
  if n_train // tr.batch_size == 0:
    raise ValueError(f"batch_size {tr.batch_size} is larger than the training set ({n_train})")
  per_pass = n_train // tr.batch_size
  per_epoch = per_pass * (cfg.T if tr.training == "sequential" else 1)
  mesh = sharding.make_mesh(tr.mesh)
  on = sharding.replicated(mesh) if mesh is not None else None  # whole splits on every device
  sub = np.random.RandomState(tr.seed).permutation(n_train)[:TRAIN_EVAL_SIZE]
  arrays = {k: sharding.place((s.images, s.labels), on) for k, s in
            (("train", ds.train), ("test", ds.test))}
  arrays["sub"] = sharding.place((ds.train.images[sub], ds.train.labels[sub]), on)

  ckpt = Checkpointer(workdir)
  model = build_model(cfg, ds.train.images.shape[1:], ds.num_classes, resolve_compute(cfg))
  # On a mesh, the state is placed first and a checkpoint restored into its shardings:
  # each host then reads just its own devices' shards.
  place = lambda s: s if mesh is None else sharding.place(
      s, sharding.state_shardings(method.STACKED, mesh, s))
  with jax.transfer_guard("allow"):  # setup builds the state from host values; the loop won't
    key = jax.random.key(tr.seed)
    found = (ckpt.restore_latest(place(init_state(cfg, model, key)), print_fn, set_aside=primary)
             if ckpt.latest_step() is not None else None)
    if found is None:  # prototypes come from the data for a fresh run; a resumed one restores its own
      state = place(init_state(cfg, model, key, ds.train.images, ds.train.labels))
  meta = {"step": 0, "train_seconds": 0.0, "loss_sum": 0.0, "loss_count": 0}
  if found is not None:
    ckpt_step, state, meta = found
    if mesh is None:  # orbax commits the arrays to a device, which would compile other
      state = jax.device_put(jax.device_get(state))  # programs than a fresh state's
    print_fn(f"resuming from checkpoint at step {ckpt_step} (epoch {ckpt_step // per_epoch + 1}, "
             f"{ckpt_step % per_epoch}/{per_epoch} steps into it)")
  # Every program the loop runs, compiled now: epoch times are training alone.
  t0 = time.perf_counter()
  with jax.transfer_guard("allow"):
    order = batch_order(state["rng"], state["step"], n_train, per_pass)
    key = jax.random.key(tr.seed)
  compute, model, step_fn = fit_blocks_per_step(cfg, ds.num_classes, n_train, state,
                                                *arrays["train"], order)
  eval_test = fit_evaluator(cfg, model, compute, tr.inference_runs, state, *arrays["test"], key)
  eval_train = fit_evaluator(cfg, model, compute, 0, state, *arrays["sub"], key)
  all_finite = jax.jit(core.all_finite).lower(state).compile()
  run = Run(cfg, ds, model, compute, step_fn, eval_test, eval_train, arrays, per_epoch,
            per_pass, all_finite, time.perf_counter() - t0, ckpt, int(meta["step"]), meta)
  how = method.describe(model, compute, state)
  if tr.training == "sequential":
    how += ", sequential training (Algorithm 1: one block per step)"
  how += "".join([f", mesh {tr.mesh_shape}" if tr.mesh else "",
                  f", {tr.precision} compute" if tr.precision != "float32" else ""])
  print_fn(f"{method.NAME} on {ds.name} ({n_train} train / {len(ds.test.labels)} test, from "
           f"{ds.source}); {how}, backend={jax.default_backend()}; compiled in "
           f"{run.compile_seconds:.1f}s")
  return run, state


def _data_meta(run: Run) -> dict[str, Any]:
  """The data's shapes, saved with every checkpoint: `load_run` rebuilds the model from them."""
  return {"input_shape": list(run.model.input_shape), "num_classes": run.model.num_classes}


def _check_health(run: Run, loss, skipped, step: int, state=None) -> None:
  """Stop, naming the last good checkpoint, if the loss so far is non-finite, an update
  was refused as non-finite, or (when given) the state is not all finite. Every
  checkpoint is written only after this check, so every checkpoint is finite."""
  loss, skipped, ok = jax.device_get((loss, skipped, True if state is None else run.all_finite(state)))
  if math.isfinite(float(loss)) and float(skipped) == 0 and bool(ok):
    return
  what = ("a non-finite training loss" if not math.isfinite(float(loss)) else
          f"{int(skipped)} non-finite update(s) (refused)" if float(skipped) else
          "non-finite parameters")
  last = run.ckpt.finished_step()
  tr = run.cfg.train
  where = (f"the last good checkpoint is step {last} in {run.ckpt.dir} (a checkpoint is "
           "written only once its state and the next step's loss on it are finite)" if last is not None
           else "no checkpoint had been written yet")
  raise NonFiniteLossError(
      f"training diverged: {what} by step {step}; stopped without saving: {where}. Rerun the "
      f"same command with a lower learning rate (e.g. --lr {tr.lr / 10:g}) or a smaller "
      f"--grad-clip to {'resume from it' if last is not None else 'start again'}: the optimizer "
      "settings may change on resume, and the change is recorded in config.json")


def _hold(run: Run, step: int, state, meta: dict[str, Any]) -> None:
  """Keep a copy of the (checked) state at `step`, to checkpoint once the next step's loss
  on it is finite: a finite state can still be one that training diverges from at once
  (parameters blown up by a too-large step), and resuming from it would diverge again."""
  run.held = (step, jax.tree.map(lambda a: a.copy(), state), {**meta, **_data_meta(run)})


def _release(run: Run, loss, skipped, step: int) -> None:
  """Checkpoint the held state, now that `loss` (the step after it) is known finite; a
  NonFiniteLossError instead, dropping it."""
  if run.held is not None:
    held, run.held = run.held, None
    _check_health(run, loss, skipped, step)
    run.ckpt.save(*held, copy=False)


def run_epoch(run: Run, state, epoch: int, checkpoint_every: int, log_every: int,
              progress: bool, stop_at_step: int | None, train_seconds: float):
  """Train one epoch (or its rest, when resuming). Returns (state, last metrics, mean loss,
  seconds), or None when `stop_at_step` (a simulated kill, for tests) is reached."""
  first = max(run.start, epoch * run.per_epoch)
  resumed = first == run.start
  # An explicit transfer (jnp.float32 would be an implicit one), placed like the data.
  on = run.arrays["train"][1].sharding
  loss_sum = sharding.place(np.float32(run.meta["loss_sum"] if resumed else 0.0), on)
  skipped = sharding.place(np.float32(0.0), on)  # updates refused as non-finite (every checkpoint has none)
  count = int(run.meta["loss_count"]) if resumed else 0
  bar = tqdm(range(first, (epoch + 1) * run.per_epoch), initial=first - epoch * run.per_epoch,
             total=run.per_epoch, desc=f"epoch {epoch + 1}/{run.cfg.train.epochs}",
             disable=not progress, leave=False, dynamic_ncols=True)
  t0, pending = time.perf_counter(), None  # the last log step's metrics, on their way to the host
  n_train = len(run.arrays["train"][1])
  order = None
  for step in bar:
    if order is None or step % run.per_pass == 0:  # a new pass: its batch order
      order = batch_order(state["rng"], state["step"], n_train, run.per_pass)
    state, m = run.step_fn(state, *run.arrays["train"], order)
    loss_sum, count, done = loss_sum + m["loss"], count + 1, step + 1
    skipped = skipped + m["skipped"]
    _release(run, m["loss"], m["skipped"], done)
    if done % log_every == 0:
      # Read the previous interval's metrics (copied meanwhile), start this one's copy:
      # the loop never waits on the device just to log.
      if pending is not None:
        host = jax.device_get(pending[1])
        _check_health(run, host["loss_sum"], host["skipped"], pending[0])
        bar.set_postfix(loss=f"{float(host['loss']):.4g}",
                        acc=f"{float(np.mean(host['block_accuracy'])):.3f}")
      pending = (done, {"loss": m["loss"], "block_accuracy": m["block_accuracy"],
                        "loss_sum": loss_sum, "skipped": skipped})
      for v in pending[1].values():
        v.copy_to_host_async()
    if done % checkpoint_every == 0 or done == stop_at_step:
      # Never save (or stop) past a non-finite loss or state: check them, synchronously.
      _check_health(run, loss_sum, skipped, done, state)
    if done == stop_at_step:
      return None
    if done % checkpoint_every == 0 and done % run.per_epoch:
      _hold(run, done, state, {"step": done, "train_seconds": train_seconds + time.perf_counter() - t0,
                               "loss_sum": float(jax.device_get(loss_sum)), "loss_count": count})
  bar.close()
  _check_health(run, loss_sum, skipped, (epoch + 1) * run.per_epoch, state)  # train holds it next
  epoch_loss = float(jax.device_get(loss_sum)) / max(count, 1)
  return state, m, epoch_loss, time.perf_counter() - t0


def evaluate(run: Run, state, key, train_subset: bool = True) -> dict[str, Any]:
  """Test accuracy by the mean path and sampled runs (and the train subset's)."""
  t0 = time.perf_counter()
  acc_mean, acc_stoch = jax.device_get(run.eval_test(state, *run.arrays["test"], key))
  out = {"test_accuracy": float(acc_mean if run.cfg.train.inference == "mean" else acc_stoch.mean()),
         "test_accuracy_mean_path": float(acc_mean),
         "test_accuracy_stochastic": float(acc_stoch.mean()),
         "test_accuracy_stochastic_runs": [float(a) for a in acc_stoch]}
  if train_subset:
    out["train_accuracy"] = float(jax.device_get(run.eval_train(state, *run.arrays["sub"], key))[0])
  return {**out, "eval_seconds": time.perf_counter() - t0}


def _host_metrics(tree) -> dict[str, Any]:
  return {k: (float(v) if np.ndim(v) == 0 else [float(a) for a in np.asarray(v)])
          for k, v in jax.device_get(tree).items()}


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
  """The printed line of a metrics.jsonl record."""
  accs = (f", train acc {r['train_accuracy']:.4f}, test acc {r['test_accuracy']:.4f} (mean path "
          f"{r['test_accuracy_mean_path']:.4f}, stochastic {r['test_accuracy_stochastic']:.4f})"
          if "test_accuracy" in r else "")
  sched = f", gamma_0 {r['gamma_0']:.3f}, gamma_1 {r['gamma_1']:.3f}" if "gamma_0" in r else ""
  return f"epoch {r['epoch']}/{epochs}: loss {r['train_loss']:.4g}{accs}{sched}, {r['seconds']:.1f}s"


def train(cfg: RunConfig, workdir: str | Path, dataset: Dataset | None = None,
          checkpoint_every: int = 200, log_every: int = 10, progress: bool = True,
          stop_at_step: int | None = None, print_fn: Callable[[str], None] = print) -> dict | None:
  """Train `cfg` in `workdir` (resuming what is there) and return the summary.

  `dataset` overrides loading cfg.data. `stop_at_step` simulates an interruption (for
  tests): training stops right after that step, as a kill would, and returns None.
  """
  for name, v in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
    if v < 1:
      raise ValueError(f"{name} must be >= 1 (steps), got {v}")
  workdir = wd.prepare(workdir)
  # On several hosts every process trains and checkpoints; only process 0 writes files.
  primary = jax.process_index() == 0
  print_fn = print_fn if primary else (lambda _: None)
  with wd.lock(workdir, print_fn) if primary else contextlib.nullcontext():
    if primary:
      wd.remove_stale_temps(workdir)
    saved = wd.read(workdir)
    if saved.config is not None:  # refuse another run's workdir before loading anything
      wd.config_changes(workdir, saved.config, cfg.to_dict())
    ds = dataset if dataset is not None else load(cfg.data.dataset, cfg.data.data_dir, verify=cfg.data.verify)
    run, state = setup(cfg, workdir, ds, print_fn, primary)
    start_epoch = run.start // run.per_epoch
    records = _kept_records(run, saved.records, workdir)
    if primary:  # the run has started (data read, state built, step compiled): record it
      wd.record_start(workdir, saved, cfg.to_dict(), run.start)
      if len(records) < len(saved.records):  # epochs after the checkpoint run again
        wd.write_records(workdir / "metrics.jsonl", records)
    return _loop(run, state, workdir, records, start_epoch, checkpoint_every, log_every,
                 progress, stop_at_step, print_fn, primary)


def _kept_records(run: Run, records: list[dict], workdir: Path) -> list[dict]:
  """metrics.jsonl's records up to the restored checkpoint; a WorkdirError if they are
  not this run's (steps that do not fit its epochs)."""
  for r in records:
    if r["step"] != r["epoch"] * run.per_epoch:
      raise wd.WorkdirError(
          f"{workdir / 'metrics.jsonl'}: epoch {r['epoch']} ends at step {r['step']}, but this "
          f"run's epochs are {run.per_epoch} steps: the file is not this run's; move it away "
          "or use another --workdir")
  return [r for r in records if r["epoch"] <= run.start // run.per_epoch]


def _loop(run: Run, state, workdir: Path, records: list[dict], start_epoch: int,
          checkpoint_every: int, log_every: int, progress: bool, stop_at_step: int | None,
          print_fn, primary: bool) -> dict | None:
  """The epochs from `start_epoch` on, then the summary."""
  tr = run.cfg.train
  with jax.transfer_guard("allow"):
    eval_key = jax.random.fold_in(jax.random.key(tr.seed), 3)
    eval_keys = list(jax.random.split(eval_key, tr.epochs))  # one per epoch, on the device
    final_key = jax.random.fold_in(eval_key, 10**6)
  train_seconds = float(run.meta["train_seconds"])
  try:
    for epoch in range(start_epoch, tr.epochs):
      out = run_epoch(run, state, epoch, checkpoint_every, log_every, progress,
                      stop_at_step, train_seconds)
      if out is None:
        return None
      state, m, epoch_loss, seconds = out
      train_seconds += seconds
      last = _host_metrics(m)  # the epoch's last step
      record = {"epoch": epoch + 1, "step": (epoch + 1) * run.per_epoch, "train_loss": epoch_loss,
                "seconds": seconds, **{k: v for k, v in last.items() if k not in ("loss", "skipped")}}
      evaluated = (epoch + 1) % tr.eval_every == 0 or epoch + 1 == tr.epochs
      if evaluated:
        e = evaluate(run, state, eval_keys[epoch])
        record.update({k: v for k, v in e.items() if k != "test_accuracy_stochastic_runs"})
      records.append(record)
      if primary:
        wd.write_records(workdir / "metrics.jsonl", records)
      done = (epoch + 1) * run.per_epoch
      _hold(run, done, state, {"step": done, "train_seconds": train_seconds, "loss_sum": 0.0,
                               "loss_count": 0})
      print_fn(_epoch_line(record, tr.epochs))
    if run.held is not None:  # the final state has no next step: written as checked (finite)
      run.ckpt.save(*run.held, copy=False)
      run.held = None
  finally:
    run.ckpt.close()
  final_step = max(run.start, tr.epochs * run.per_epoch)
  if run.start > tr.epochs * run.per_epoch:
    print_fn(f"the checkpoint is at step {run.start}, past --epochs {tr.epochs} "
             f"({tr.epochs * run.per_epoch} steps): nothing to train; evaluating it as it is")
  summary = summarize(run, state, final_key, train_seconds, final_step)
  if primary:
    wd.write_json(workdir / "summary.json", summary)
  return summary


def summarize(run: Run, state, key, train_seconds: float, step: int) -> dict[str, Any]:
  """The final evaluation of the state at `step` (epochs: the steps it has trained, in epochs)."""
  e = evaluate(run, state, key, train_subset=False)
  epochs = step / run.per_epoch
  return {**{k: v for k, v in e.items() if k != "eval_seconds"},
          "inference": run.cfg.train.inference,
          "params_per_block": METHODS[run.cfg.method].num_block_params(state),
          "train_seconds": train_seconds, "compile_seconds": run.compile_seconds,
          "epochs": int(epochs) if epochs.is_integer() else epochs,
          "steps": step, "n_train": len(run.ds.train.labels),
          "n_test": len(run.ds.test.labels), "input_shape": list(run.model.input_shape),
          "num_classes": run.model.num_classes, "data_source": run.ds.source,
          "backend": jax.default_backend(), "compute": dataclasses.asdict(run.compute),
          "conv_impl": getattr(run.model.block, "conv_impl", None),
          "host_memory": host_memory.status, "mesh": run.cfg.train.mesh_shape, "config": run.cfg.to_dict()}


def load_run(workdir: str | Path, step: int | None = None):
  """(config, model, state, step) of a training run's checkpoint: `step`'s, or the newest
  that restores (a damaged one is skipped with a warning)."""
  workdir = Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training run's workdir")
  cfg = RunConfig.from_dict(wd.read_config(path)[0])

  def like(meta):
    model = build_model(cfg, tuple(meta["input_shape"]), meta["num_classes"], resolve_compute(cfg))
    return model, init_state(cfg, model, jax.random.key(0))

  ckpt = Checkpointer(workdir)
  try:
    if step is None:
      found = ckpt.restore_latest(lambda meta: like(meta)[1], lambda m: print(m, file=sys.stderr),
                                  set_aside=False)
      if found is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
      step, state, meta = found
    else:
      meta = ckpt.meta(step)
      state, _ = ckpt.restore(step, like(meta)[1])
    model = like(meta)[0]
  finally:
    ckpt.close()
  return cfg, model, state, step
