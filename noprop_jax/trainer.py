"""The training loop behind experiments/train.py: the data on the device, one jitted step
per batch, evaluation, checkpoints and exact resume, for any registered method.

`train` reads top to bottom: `setup` builds everything once, `run_epoch` trains one
epoch, `evaluate` measures, `summarize` writes the summary. What differs per method
comes from its record (`RunConfig.method_record`, see `noprop_jax.method`); the
programs come from `programs`, fitted to the device's memory by `autotune`; the
checkpoint health policy is `health`'s.
"""

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from noprop_jax import core, health, host_memory, sharding, stopping
from noprop_jax import method as methods
from noprop_jax import workdir as wd
from noprop_jax.autotune import fit_blocks_per_step, fit_evaluator
from noprop_jax.checkpoint import Checkpointer
from noprop_jax.config import RunConfig
from noprop_jax.data import Dataset, load
from noprop_jax.health import NonFiniteLossError
from noprop_jax.programs import (batch_order, build_model, init_state, make_epoch_step,
                                 make_evaluator, resolve_compute)

# The programs' builders, importable from here as from `programs`.
__all__ = ["NonFiniteLossError", "Run", "batch_order", "build_model", "evaluate", "init_state",
           "load_run", "make_epoch_step", "make_evaluator", "resolve_compute", "run_epoch",
           "setup", "summarize", "train"]

TRAIN_EVAL_SIZE = 10_000  # train_accuracy is measured on a fixed subset of this many
# Checkpointers of runs stopped at once (`stopping.StopNow`) with a save still in flight:
# the next run in this process (a notebook's) waits for it before touching the checkpoints.
_ABANDONED: list[Checkpointer] = []


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
  all_finite: Callable  # state -> whether every float in it is finite (`health.check`)
  compile_seconds: float
  ckpt: Checkpointer
  start: int
  meta: dict
  held: tuple | None = None  # (step, state copy, meta) waiting to be checkpointed (`health.hold`)
  stop_check: Callable = dataclasses.field(default_factory=stopping.Check)  # asked every step
  stopping: str | None = None  # why the run stops (a signal, a request), once asked to


def setup(cfg: RunConfig, workdir: Path, ds: Dataset, print_fn,
          primary: bool = True, keep: int = 2) -> tuple[Run, Any]:
  """Check the data and the disk (room for `keep` checkpoints), build the model, restore
  (the newest intact checkpoint) or initialise the state, compile the step."""
  tr, method = cfg.train, cfg.method_record
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

  ckpt = Checkpointer(workdir, keep, cleanup=True)  # removes a killed run's partial saves
  model = build_model(cfg, ds.train.images.shape[1:], ds.num_classes, resolve_compute(cfg))
  abstract = jax.eval_shape(lambda: init_state(cfg, model, jax.random.key(0)))
  # The method's state against the contract, before it is placed on a mesh or restored
  # into: a broken one gets its own error, not a sharding's or a checkpoint's.
  methods.check_state(method, abstract, cfg.T)
  ckpt.check_space(abstract)  # a full disk refused now, not at the first checkpoint
  # On a mesh, the state is placed first and a checkpoint restored into its shardings:
  # each host then reads just its own devices' shards.
  place = lambda s: s if mesh is None else sharding.place(
      s, sharding.state_shardings(method.stacked, mesh, s))
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
  methods.check_metrics(method, step_fn.out_info[1])
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
  print_fn(f"{method.title} on {ds.name} ({n_train} train / {len(ds.test.labels)} test, from "
           f"{ds.source}); {how}, backend={jax.default_backend()}; compiled in "
           f"{run.compile_seconds:.1f}s; host memory: {host_memory.status}")
  return run, state


def run_epoch(run: Run, state, epoch: int, checkpoint_every: int, log_every: int,
              progress: bool, train_seconds: float):
  """Train one epoch (or its rest, when resuming). Returns (state, last metrics, mean loss,
  seconds, stop) where `stop` is the (step, meta) to checkpoint when a stop was asked for
  mid-epoch (`run.stopping` says why), else None."""
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
  # The progress bar's accuracy: the method's block accuracy, where it reports one.
  shown = [k for k in ("block_accuracy",) if k in run.cfg.method_record.metrics]
  order, stop = None, None
  # What a mid-epoch checkpoint saves beside the state, to resume the epoch's loss exactly.
  meta = lambda done: {"step": done, "train_seconds": train_seconds + time.perf_counter() - t0,
                       "loss_sum": float(jax.device_get(loss_sum)), "loss_count": count}
  for step in bar:
    if order is None or step % run.per_pass == 0:  # a new pass: its batch order
      order = batch_order(state["rng"], state["step"], n_train, run.per_pass)
    state, m = run.step_fn(state, *run.arrays["train"], order)
    loss_sum, count, done = loss_sum + m["loss"], count + 1, step + 1
    skipped = skipped + m["skipped"]
    health.release(run, m["loss"], m["skipped"], done)
    if done % log_every == 0:
      # Read the previous interval's metrics (copied meanwhile), start this one's copy:
      # the loop never waits on the device just to log.
      if pending is not None:
        host = jax.device_get(pending[1])
        health.check(run, host["loss_sum"], host["skipped"], pending[0])
        bar.set_postfix({"loss": f"{float(host['loss']):.4g}",
                         **{k: f"{float(np.mean(host[k])):.3f}" for k in shown}})
      pending = (done, {"loss": m["loss"], "loss_sum": loss_sum, "skipped": skipped,
                        **{k: m[k] for k in shown}})
      for v in pending[1].values():
        v.copy_to_host_async()
    if done % checkpoint_every == 0:
      # Never save past a non-finite loss or state: check them, synchronously.
      health.check(run, loss_sum, skipped, done, state)
    mid_epoch = done % run.per_epoch
    if done % checkpoint_every == 0 and mid_epoch:
      health.hold(run, done, state, meta(done))
    # Asked at every step (on several hosts, every process must ask at every step to
    # agree on the step). At an epoch's last step the epoch is finished first.
    run.stopping = run.stopping or run.stop_check(done)
    if run.stopping and mid_epoch:
      stop = (done, meta(done))
      break
  bar.close()
  health.check(run, loss_sum, skipped, done if stop else (epoch + 1) * run.per_epoch, state)
  epoch_loss = float(jax.device_get(loss_sum)) / max(count, 1)
  return state, m, epoch_loss, time.perf_counter() - t0, stop


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


def _epoch_line(r: dict[str, Any], epochs: int, shown: tuple[str, ...]) -> str:
  """The printed line of a metrics.jsonl record; `shown`: the method's metrics to print."""
  accs = (f", train acc {r['train_accuracy']:.4f}, test acc {r['test_accuracy']:.4f} (mean path "
          f"{r['test_accuracy_mean_path']:.4f}, stochastic {r['test_accuracy_stochastic']:.4f})"
          if "test_accuracy" in r else "")
  own = "".join(f", {k} {r[k]:.3f}" for k in shown)
  return f"epoch {r['epoch']}/{epochs}: loss {r['train_loss']:.4g}{accs}{own}, {r['seconds']:.1f}s"


def train(cfg: RunConfig, workdir: str | Path, dataset: Dataset | None = None,
          checkpoint_every: int = 200, log_every: int = 10, progress: bool = True,
          print_fn: Callable[[str], None] = print, keep_checkpoints: int = 2) -> dict:
  """Train `cfg` in `workdir` (resuming what is there) and return the summary.

  The newest `keep_checkpoints` checkpoints are kept; the run refuses to start
  (`workdir.DiskFullError`) where the disk has no room for them.

  `dataset` overrides loading cfg.data. SIGTERM, SIGINT or `stopping.request()` stop the
  run cleanly after the step in flight, checkpointed: `stopping.Stopped` is raised, and
  calling `train` again resumes (see `noprop_jax.stopping`).
  """
  for name, v in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
    if v < 1:
      raise ValueError(f"{name} must be >= 1 (steps), got {v}")
  if keep_checkpoints < 1:
    raise ValueError(f"keep_checkpoints must be >= 1 (checkpoints), got {keep_checkpoints}")
  workdir = wd.prepare(workdir)
  # On several hosts every process trains and checkpoints; only process 0 writes files.
  primary = jax.process_index() == 0
  print_fn = print_fn if primary else (lambda _: None)
  with (stopping.handled(), wd.lock(workdir, print_fn) if primary else contextlib.nullcontext()):
    while _ABANDONED:  # their saves finish (or fail: that earlier run's) before this run starts
      with contextlib.suppress(Exception):
        _ABANDONED.pop().close()
    if primary:
      wd.remove_stale_temps(workdir)
    saved = wd.read(workdir)
    if saved.config is not None:  # refuse another run's workdir before loading anything
      wd.config_changes(workdir, saved.config, cfg.to_dict(), cfg.resumable)
    ds = dataset if dataset is not None else load(cfg.data.dataset, cfg.data.data_dir, verify=cfg.data.verify)
    run, state = setup(cfg, workdir, ds, print_fn, primary, keep_checkpoints)
    start_epoch = run.start // run.per_epoch
    records = _kept_records(run, saved.records, workdir)
    if primary:  # the run has started (data read, state built, step compiled): record it
      wd.record_start(workdir, saved, cfg.to_dict(), run.start, cfg.resumable)
      if len(records) < len(saved.records) or saved.stop:  # epochs after the checkpoint
        wd.write_records(workdir / "metrics.jsonl", records)  # run again; a stop is over
    return _loop(run, state, workdir, records, start_epoch, checkpoint_every, log_every,
                 progress, print_fn, primary)


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
          checkpoint_every: int, log_every: int, progress: bool, print_fn,
          primary: bool) -> dict:
  """The epochs from `start_epoch` on, then the summary."""
  tr, method = run.cfg.train, run.cfg.method_record
  with jax.transfer_guard("allow"):
    eval_key = jax.random.fold_in(jax.random.key(tr.seed), 3)
    eval_keys = list(jax.random.split(eval_key, tr.epochs))  # one per epoch, on the device
    final_key = jax.random.fold_in(eval_key, 10**6)
  train_seconds = float(run.meta["train_seconds"])
  at_once = False  # stopped by a second signal: nothing more is waited for
  try:
    for epoch in range(start_epoch, tr.epochs):
      state, m, epoch_loss, seconds, stop = run_epoch(run, state, epoch, checkpoint_every,
                                                      log_every, progress, train_seconds)
      train_seconds += seconds
      if stop:
        _stop(run, stop[0], state, stop[1], workdir, records, primary)
      last = _host_metrics(m)  # the epoch's last step (its keys checked in `setup`)
      record = {"epoch": epoch + 1, "step": (epoch + 1) * run.per_epoch, "train_loss": epoch_loss,
                "seconds": seconds, **{k: last[k] for k in method.metrics}}
      evaluated = (epoch + 1) % tr.eval_every == 0 or epoch + 1 == tr.epochs
      if evaluated:
        e = evaluate(run, state, eval_keys[epoch])
        record.update({k: v for k, v in e.items() if k != "test_accuracy_stochastic_runs"})
      records.append(record)
      if primary:
        wd.write_records(workdir / "metrics.jsonl", records)
      done = (epoch + 1) * run.per_epoch
      health.hold(run, done, state, {"step": done, "train_seconds": train_seconds,
                                     "loss_sum": 0.0, "loss_count": 0})
      print_fn(_epoch_line(record, tr.epochs, method.shown))
      run.stopping = run.stopping or run.stop_check.at_boundary()  # e.g. during the evaluation
      if run.stopping and epoch + 1 < tr.epochs:
        _stop(run, done, run.held[1], run.held[2], workdir, records, primary)
    if run.held is not None:  # the final state has no next step: written as checked (finite)
      run.ckpt.save(*run.held, copy=False)
      run.held = None
  except stopping.StopNow:
    at_once = True  # the save in flight, if any, is not waited for (the next run does)
    _ABANDONED.append(run.ckpt)
    raise
  finally:
    if not at_once:
      run.ckpt.close()
  final_step = max(run.start, tr.epochs * run.per_epoch)
  if run.start > tr.epochs * run.per_epoch:
    print_fn(f"the checkpoint is at step {run.start}, past --epochs {tr.epochs} "
             f"({tr.epochs * run.per_epoch} steps): nothing to train; evaluating it as it is")
  summary = summarize(run, state, final_key, train_seconds, final_step)
  if primary:
    wd.write_json(workdir / "summary.json", summary)
  return summary


def _stop(run: Run, step: int, state, meta: dict, workdir: Path, records: list[dict],
          primary: bool) -> None:
  """Checkpoint `state` at `step`, verify it, say in metrics.jsonl where the run stopped,
  and raise `stopping.Stopped`.

  The state is checked finite (`health.check`) but, unlike a scheduled checkpoint, not
  held until the next step's loss is known: there is no next step. Should training
  diverge right after it on resume, the error says so and which settings may change.
  """
  run.held = None  # a scheduled checkpoint of this step, held for the next: written now
  run.ckpt.save(step, state, {**meta, **health.data_meta(run.model)}, copy=False)
  finished = run.ckpt.finished_step()
  if finished != step or run.ckpt.meta(step).get("step") != step:
    raise wd.WorkdirError(f"stopping at step {step}: its checkpoint in {run.ckpt.dir} could "
                          f"not be verified (the newest is step {finished}); rerunning resumes "
                          "from the newest that restores")
  epoch, into = divmod(step, run.per_epoch)
  where = (f"epoch {epoch} done" if not into else
           f"epoch {epoch + 1}, {into}/{run.per_epoch} steps into it")
  if primary:
    wd.write_records(workdir / "metrics.jsonl", records,
                     {"stopped": run.stopping, "step": step, "epochs": step / run.per_epoch,
                      "time": wd.now()})
  raise stopping.Stopped(step, run.stopping,
                         f"stopped at step {step} ({where}) on {run.stopping}: checkpoint "
                         f"written and verified in {run.ckpt.dir}; run the same command again "
                         "to resume from it")


def summarize(run: Run, state, key, train_seconds: float, step: int) -> dict[str, Any]:
  """The final evaluation of the state at `step` (epochs: the steps it has trained, in epochs)."""
  e = evaluate(run, state, key, train_subset=False)
  epochs = step / run.per_epoch
  method = run.cfg.method_record
  own = method.summary(run.model, state) if method.summary else {}
  return {**own, **{k: v for k, v in e.items() if k != "eval_seconds"},
          "inference": run.cfg.train.inference,
          "params_per_block": run.cfg.method_record.num_block_params(state),
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
