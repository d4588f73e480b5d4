"""The training loop behind experiments/train.py: device-resident data, one
jitted step per batch, per-epoch evaluation, checkpoints and exact resume."""

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from noprop_jax import adjoint, backprop, continuous, dt, sharding
from noprop_jax.checkpoint import Checkpointer, guard_config
from noprop_jax.config import Config
from noprop_jax.data import Dataset, load
from noprop_jax.prototypes import prototype_embedding

TRAIN_EVAL_SIZE = 10_000  # train_accuracy is measured on a fixed subset of this many


class NonFiniteLossError(FloatingPointError):
  pass


_MODULES = {"dt": dt, "ct": continuous, "fm": continuous, "backprop": backprop, "adjoint": adjoint}


def method_module(cfg: Config):
  """The module implementing cfg.method: `init`, `train_step`, `predict`, `eval_counts`,
  `params_per_block`."""
  return _MODULES[cfg.method]


def init_state(cfg: Config, key: jax.Array, train_images=None, train_labels=None):
  """The method's initial state; prototype embeddings are computed from the training split
  (without it, they are zeros: a template for restoring a checkpoint)."""
  embed = None
  if cfg.embedding == "prototype":
    if train_images is None:
      embed = jnp.zeros((cfg.num_classes, cfg.embedding_dim), jnp.float32)
    else:
      embed = prototype_embedding(train_images, train_labels, cfg.num_classes)
  return method_module(cfg).init(cfg, key, embed=embed)


def class_embeddings(cfg: Config, state) -> jax.Array:
  """W_embed [m, d] of a state of any method (the identity for one-hot)."""
  return dt.embedding_matrix(state["shared"] if cfg.method == "dt" else state["params"], cfg)


def predict(cfg: Config, state, x: jax.Array, key: jax.Array | None = None,
            mode: str | None = None) -> jax.Array:
  """Class scores [B, m] for images x of any method (argmax is the prediction)."""
  return method_module(cfg).predict(cfg, state, x, key=key, mode=mode)


def make_epoch_step(cfg: Config, n_train: int) -> Callable:
  """Jitted `(state, images, labels) -> (state, metrics)`.

  The batch is cut on the device from the whole training split: pass p =
  step // steps_per_pass is shuffled by a permutation keyed on (seed, p), so a
  run resumed at any step sees exactly the batches it would have seen.
  Sequential training (Algorithm 1) updates block p % T during pass p.
  With cfg.mesh, the batch is split on the mesh's 'data' axis and the state
  keeps the shardings of `sharding.state_shardings` (stacked blocks on 'blocks').
  """
  B = cfg.batch_size
  per_pass = n_train // B
  mesh = sharding.make_mesh(cfg)

  def step(state, images, labels):
    p, i = jnp.divmod(state["step"], per_pass)
    # Derived from the seed inside the step: a Python-side key would be a host transfer.
    data_key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    perm = jax.random.permutation(jax.random.fold_in(data_key, p), n_train)
    idx = lax.dynamic_slice_in_dim(perm, i * B, B)
    x, y = images[idx], labels[idx]
    if mesh is not None:
      x, y = sharding.constrain((x, y), sharding.batch_sharding(mesh))
    if cfg.method == "dt":
      if cfg.training == "sequential":
        state, m = dt.sequential_step(cfg, state, x, y, p % cfg.T)
      else:
        state, m = dt.parallel_step(cfg, state, x, y)
    else:
      state, m = method_module(cfg).train_step(cfg, state, x, y)
    if mesh is not None:
      state = sharding.constrain(state, sharding.state_shardings(cfg, mesh, state))
    return state, m

  return jax.jit(step, donate_argnums=0)


def _peak_bytes(compiled) -> int | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def fit_blocks_per_step(cfg: Config, n_train: int, state, images, labels, fraction: float = 0.9,
                        limit_bytes: float | None = None) -> tuple[Config, Callable]:
  """Resolve blocks_per_step 0 (auto): (cfg with it set, the compiled epoch step).

  All T blocks at once is the fastest formulation; where the device reports its
  memory (GPU/TPU), the largest divisor k of T whose compiled step needs at most
  `fraction` of it (XLA's memory analysis, per device) is taken instead. On
  XLA:CPU, which reports no limit, all T. `limit_bytes` overrides the device's
  limit. Other settings pass through unchanged.
  """
  step = make_epoch_step(cfg, n_train)
  if cfg.method != "dt" or cfg.training != "parallel" or cfg.blocks_per_step:
    return cfg, step
  limit = limit_bytes or (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  if not limit:
    return dataclasses.replace(cfg, blocks_per_step=cfg.resolved_blocks_per_step()), step
  candidates = [k for k in range(cfg.T, 0, -1) if cfg.T % k == 0
                and k % cfg.mesh_shape["blocks"] == 0]
  if cfg.resolved_formulation() == "scan":
    candidates = [1]
  need = {}
  for k in candidates:
    c = dataclasses.replace(cfg, blocks_per_step=k)
    compiled = make_epoch_step(c, n_train).lower(state, images, labels).compile()
    need[k] = _peak_bytes(compiled)
    if need[k] is None or need[k] <= (fraction * limit if limit_bytes is None else limit):
      return c, compiled
  raise MemoryError(
      f"no blocks_per_step fits in the device's {limit / 2**30:.2f} GiB (use at most "
      f"{fraction:.0%} of it): "
      + ", ".join(f"k={k} needs {b / 2**30:.2f} GiB" for k, b in need.items())
      + "; lower --batch-size or shard the blocks over more devices (--mesh blocks=N)")


def make_evaluator(cfg: Config, n: int, runs: int, batch: int = 500) -> Callable:
  """Jitted `(state, images, labels, key) -> (mean-path accuracy, [runs] stochastic accuracies)`.

  One call covers the whole split (lax.map over fixed-size batches of the
  method's `eval_counts`, which computes the image pathway once per image).
  """
  batch = min(batch, n)
  nb = math.ceil(n / batch)

  def evaluate(state, images, labels, key):
    pad = nb * batch - n
    xs = jnp.pad(images, [(0, pad)] + [(0, 0)] * 3).reshape(nb, batch, *images.shape[1:])
    ys = jnp.pad(labels, (0, pad), constant_values=-1).reshape(nb, batch)

    counts = method_module(cfg).eval_counts
    one = lambda args: counts(cfg, state, *args, runs)

    keys = jax.random.split(key, nb)
    c_mean, c_stoch = lax.map(one, (xs, ys, keys))
    return c_mean.sum() / n, c_stoch.sum(0) / n

  return jax.jit(evaluate)


def load_run(workdir: str | Path, step: int | None = None) -> tuple[Config, Any, int]:
  """(config, state, step) of a training run's checkpoint (the latest by default)."""
  workdir = Path(workdir)
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training run's workdir")
  cfg = Config.from_dict(json.loads(path.read_text()))
  ckpt = Checkpointer(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    state, _ = ckpt.restore(step, init_state(cfg, jax.random.key(cfg.seed)))
  finally:
    ckpt.close()
  return cfg, state, step


def _host_metrics(tree) -> dict[str, Any]:
  return {k: (float(v) if np.ndim(v) == 0 else [float(a) for a in np.asarray(v)])
          for k, v in jax.device_get(tree).items()}


def _log(bar, step: int, metrics, ckpt_step: int | None, workdir: Path) -> None:
  host = jax.device_get(metrics)
  loss = float(host["loss"])
  _check_finite(loss, step, ckpt_step, workdir)
  bar.set_postfix(loss=f"{loss:.4g}", acc=f"{float(np.mean(host['block_accuracy'])):.3f}")


def _check_finite(value: float, step: int, ckpt_step: int | None, workdir: Path) -> None:
  if not math.isfinite(value):
    where = (f"the last good checkpoint (step {ckpt_step}) in {workdir / 'checkpoints'} is "
             "intact" if ckpt_step is not None else "no checkpoint had been written yet")
    raise NonFiniteLossError(f"non-finite training loss ({value}) at step {step}; stopped "
                             f"without saving: {where}. Try a lower --lr or --grad-clip.")


def train(cfg: Config, workdir: str | Path, data_dir: str | None = None, verify: bool = True,
          dataset: Dataset | None = None, checkpoint_every: int = 200, log_every: int = 10,
          progress: bool = True, stop_at_step: int | None = None,
          print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Train `cfg` in `workdir` (resuming what is there) and return the summary.

  `stop_at_step` simulates an interruption (for tests): training stops right
  after that step, as a kill would, and the function returns None.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # On several hosts (jax.distributed.initialize), every process runs this loop on its
  # own devices and takes part in checkpointing; only process 0 writes the run's files.
  primary = jax.process_index() == 0
  if not primary:
    print_fn = lambda _: None
  guard_config(workdir, cfg.to_dict(), Config().to_dict())
  ds = dataset if dataset is not None else load(cfg.dataset, data_dir, verify=verify)
  if ds.num_classes != cfg.num_classes:
    raise ValueError(f"dataset {ds.name!r} has {ds.num_classes} classes; config expects "
                     f"{cfg.num_classes}")
  dt.check_images(ds.train.images, cfg)
  dt.check_images(ds.test.images, cfg)
  n_train, n_test = len(ds.train.labels), len(ds.test.labels)
  per_pass = n_train // cfg.batch_size
  if per_pass == 0:
    raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n_train})")
  per_epoch = per_pass * (cfg.T if cfg.training == "sequential" else 1)
  total = per_epoch * cfg.epochs

  mesh = sharding.make_mesh(cfg)
  on = sharding.replicated(mesh) if mesh is not None else None  # whole splits on every device
  train_x, train_y = jax.device_put(ds.train.images, on), jax.device_put(ds.train.labels, on)
  test_x, test_y = jax.device_put(ds.test.images, on), jax.device_put(ds.test.labels, on)
  sub = np.random.RandomState(cfg.seed).permutation(n_train)[:TRAIN_EVAL_SIZE]
  sub_x, sub_y = jax.device_put(ds.train.images[sub], on), jax.device_put(ds.train.labels[sub], on)

  method = method_module(cfg)
  ckpt = Checkpointer(workdir)
  meta = {"step": 0, "train_seconds": 0.0, "loss_sum": 0.0, "loss_count": 0}
  ckpt_step = ckpt.latest_step()
  # A resumed run restores its embedding: prototypes are only computed for a fresh one.
  with jax.transfer_guard("allow"):  # setup builds the state from host values; the loop won't
    state = init_state(cfg, jax.random.key(cfg.seed),
                       *((ds.train.images, ds.train.labels) if ckpt_step is None else ()))
    eval_key = jax.random.fold_in(jax.random.key(cfg.seed), 3)
    eval_keys = list(jax.random.split(eval_key, cfg.epochs))  # one per epoch, on the device
    final_key = jax.random.fold_in(eval_key, 10**6)
  params_per_block = method.params_per_block(state)
  if ckpt_step is not None:
    state, meta = ckpt.restore(ckpt_step, state)
    print_fn(f"resuming from checkpoint at step {ckpt_step} (epoch {ckpt_step // per_epoch + 1}, "
             f"{ckpt_step % per_epoch}/{per_epoch} steps into it)")
  if mesh is not None:
    state = jax.device_put(state, sharding.state_shardings(cfg, mesh, state))
  start = int(meta["step"])
  start_epoch = start // per_epoch
  metrics_path = workdir / "metrics.jsonl"
  kept = [l for l in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
          if l.strip() and json.loads(l)["epoch"] <= start_epoch]
  if primary:
    metrics_path.write_text("".join(l + "\n" for l in kept))

  run_cfg, step_fn = fit_blocks_per_step(cfg, n_train, state, train_x, train_y)
  eval_test = make_evaluator(cfg, n_test, cfg.inference_runs)
  eval_train = make_evaluator(cfg, len(sub), 0)
  train_seconds = float(meta["train_seconds"])
  if cfg.method == "dt":
    how = (f"T={cfg.T}, {params_per_block:,} parameters per block, {cfg.training} training, "
           f"formulation={run_cfg.resolved_formulation()}"
           + (f", {run_cfg.resolved_blocks_per_step()} blocks per step"
              if cfg.training == "parallel" else ""))
  elif cfg.method == "backprop":
    how = f"T={cfg.T} chained blocks of {params_per_block:,} parameters, trained end to end"
  else:
    how = (f"one time-conditioned block of {params_per_block:,} parameters, "
           f"{cfg.inference_steps} Euler steps at inference"
           + (" and in training (adjoint method)" if cfg.method == "adjoint" else ""))
  if cfg.mesh:
    how += f", mesh {cfg.mesh_shape}"
  if cfg.precision != "float32":
    how += f", {cfg.precision} compute"
  name = {"backprop": "Backprop baseline", "adjoint": "Adjoint baseline"}.get(
      cfg.method, f"NoProp-{cfg.method.upper()}")
  print_fn(f"{name} on {ds.name} ({n_train} train / {n_test} test, from "
           f"{ds.source}); {how}, backend={jax.default_backend()}")

  try:
    for epoch in range(start_epoch, cfg.epochs):
      first = max(start, epoch * per_epoch)
      loss_sum = jax.device_put(np.float32(meta["loss_sum"] if first == start else 0.0), on)
      count = int(meta["loss_count"]) if first == start else 0
      bar = tqdm(range(first, (epoch + 1) * per_epoch), initial=first - epoch * per_epoch,
                 total=per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                 leave=False, dynamic_ncols=True)
      t0 = time.perf_counter()
      pending = None  # the last log step's metrics, on their way to the host
      for step in bar:
        state, m = step_fn(state, train_x, train_y)
        loss_sum, count = loss_sum + m["loss"], count + 1
        done = step + 1
        if done % log_every == 0:
          # Read the previous interval's metrics (copied meanwhile) and start this one's
          # copy: the loop never waits on the device just to log.
          if pending is not None:
            _log(bar, *pending, ckpt.latest_step(), workdir)
          pending = (done, {k: m[k] for k in ("loss", "block_accuracy")})
          for v in pending[1].values():
            v.copy_to_host_async()
        if done % checkpoint_every == 0 or done == stop_at_step:
          # Never save (or stop) past a non-finite loss: check this step's, synchronously.
          _check_finite(float(jax.device_get(m["loss"])), done, ckpt.latest_step(), workdir)
        if done == stop_at_step:
          return None
        if done % checkpoint_every == 0 and done % per_epoch:
          secs = train_seconds + time.perf_counter() - t0
          ckpt.save(done, state, {"step": done, "train_seconds": secs,
                                  "loss_sum": float(jax.device_get(loss_sum)), "loss_count": count})
      bar.close()
      epoch_loss = float(jax.device_get(loss_sum)) / max(count, 1)
      _check_finite(epoch_loss, (epoch + 1) * per_epoch, ckpt.latest_step(), workdir)
      seconds = time.perf_counter() - t0
      train_seconds += seconds
      k = eval_keys[epoch]
      last = _host_metrics(m)  # the epoch's last step
      record = {"epoch": epoch + 1, "step": (epoch + 1) * per_epoch, "train_loss": epoch_loss,
                "seconds": seconds, **{name: v for name, v in last.items() if name != "loss"}}
      evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
      if evaluated:
        t_eval = time.perf_counter()
        acc_mean, acc_stoch = jax.device_get(eval_test(state, test_x, test_y, k))
        tr_mean, _ = jax.device_get(eval_train(state, sub_x, sub_y, k))
        test_acc = float(acc_mean if cfg.inference == "mean" else acc_stoch.mean())
        record.update({"train_accuracy": float(tr_mean), "test_accuracy": test_acc,
                       "test_accuracy_mean_path": float(acc_mean),
                       "test_accuracy_stochastic": float(acc_stoch.mean()),
                       "eval_seconds": time.perf_counter() - t_eval})
      if primary:
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
      ckpt.save((epoch + 1) * per_epoch, state,
                {"step": (epoch + 1) * per_epoch, "train_seconds": train_seconds,
                 "loss_sum": 0.0, "loss_count": 0})
      sched = (f", gamma_0 {last['gamma_0']:.3f}, gamma_1 {last['gamma_1']:.3f}"
               if "gamma_0" in last else "")
      accs = (f", train acc {tr_mean:.4f}, test acc {test_acc:.4f} (mean path {acc_mean:.4f}, "
              f"stochastic {acc_stoch.mean():.4f})" if evaluated else "")
      print_fn(f"epoch {epoch + 1}/{cfg.epochs}: loss {epoch_loss:.4g}{accs}{sched}, "
               f"{seconds:.1f}s")
  finally:
    ckpt.close()

  acc_mean, acc_stoch = jax.device_get(
      eval_test(state, test_x, test_y, final_key))
  summary = {
      "test_accuracy": float(acc_mean if cfg.inference == "mean" else acc_stoch.mean()),
      "inference": cfg.inference,
      "test_accuracy_mean_path": float(acc_mean),
      "test_accuracy_stochastic": float(acc_stoch.mean()),
      "test_accuracy_stochastic_runs": [float(a) for a in acc_stoch],
      "params_per_block": params_per_block,
      "train_seconds": train_seconds,
      "epochs": cfg.epochs, "steps": total, "n_train": n_train, "n_test": n_test,
      "data_source": ds.source, "backend": jax.default_backend(),
      "formulation": run_cfg.resolved_formulation(), "conv_impl": run_cfg.resolved_conv_impl(),
      **({"blocks_per_step": run_cfg.resolved_blocks_per_step()}
         if cfg.method == "dt" and cfg.training == "parallel" else {}),
      "mesh": cfg.mesh_shape, "precision": cfg.precision,
      **({"inference_steps": cfg.inference_steps} if cfg.method != "dt" else {}),
      "config": cfg.to_dict(),
  }
  if primary:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary
