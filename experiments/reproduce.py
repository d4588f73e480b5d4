"""Reproduce the paper's Tables 1 and 2: train each row over seeds, tabulate, plot.

  python experiments/reproduce.py --list
  python experiments/reproduce.py --rows mnist/dt/onehot mnist/ct/onehot mnist/fm/onehot \\
      mnist/backprop/onehot --data-dir ../shared/data/mnist --epochs 1 --train-size 6000 \\
      --seeds 2 --inference-runs 2 --out runs/reproduce_short
  python experiments/reproduce.py --rows 'mnist/*' --data-dir ../shared/data/mnist   # Table 4 budgets
  python experiments/reproduce.py --rows table1 --data-dir ~/data                     # ~/data/<dataset>/
  python experiments/reproduce.py --report-only --out runs/reproduce_short --data-dir ../shared/data/mnist

Rows are `<dataset>/<method>/<embedding>`: methods backprop, dt, adjoint, ct, fm;
embeddings onehot, dim20 (learned, 20 dimensions: the paper's "dim=20") and
prototype. Table 1: MNIST, CIFAR-10, CIFAR-100 (adjoint with one-hot only).
Table 2: Tiny ImageNet; its figures are not available offline, so its paper
column reads n/a. Every setting is RunConfig.create's default for the row (the
paper's Table 4); only the flags below override.

Each (row, seed) trains in OUT/runs/<row id, / -> _>/seed<k> (rerunning resumes;
finished runs are skipped). OUT/results.md tables every run found in OUT;
OUT/plots/ holds accuracy.png (test accuracy against epoch and training time,
mean over seeds, as the paper's Figure 4), embeddings_<row>.png (learned
prototype embeddings as images, as Figure 3) and predictions_<row>.png (the
first 36 test images, predicted vs true label, errors in red).
"""

import argparse
import dataclasses
import fnmatch
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib.figure import Figure

from noprop_jax import data, host_memory
from noprop_jax import workdir as run_files
from noprop_jax.config import RunConfig, method_settings

# ----------------------------------------------------------------------------- rows

EMBEDDING_LABELS = ("onehot", "dim20", "prototype")
# Test accuracy (%), paper Table 1, columns one-hot / dim=20 / prototype.
PAPER_TABLE1: dict[tuple[str, str], tuple[float | None, ...]] = {
    ("mnist", "backprop"): (99.46, 99.43, 99.44),
    ("mnist", "dt"): (99.47, 99.49, 99.54),
    ("mnist", "adjoint"): (98.62, None, None),
    ("mnist", "ct"): (97.84, 97.7, 97.17),
    ("mnist", "fm"): (99.21, 99.29, 98.52),
    ("cifar10", "backprop"): (79.92, 79.3, 79.58),
    ("cifar10", "dt"): (79.25, 79.12, 80.54),
    ("cifar10", "adjoint"): (66.78, None, None),
    ("cifar10", "ct"): (73.35, 71.77, 66.54),
    ("cifar10", "fm"): (73.14, 73.5, 75.18),
    ("cifar100", "backprop"): (45.85, 46.57, 47.8),
    ("cifar100", "dt"): (45.93, 45.19, 46.06),
    ("cifar100", "adjoint"): (25.03, None, None),
    ("cifar100", "ct"): (33.66, 33.99, 21.31),
    ("cifar100", "fm"): (6.38, 31.14, 37.57),
}
# The paper's rows, in its order: Table 1 (MNIST, CIFAR) and Table 2 (Tiny ImageNet, no adjoint).
PAPER_METHODS = {1: ("backprop", "dt", "adjoint", "ct", "fm"), 2: ("backprop", "dt", "ct", "fm")}


def embedding_label(embedding: str, embedding_dim: int) -> str:
  """'onehot', 'prototype', or 'dim<d>' for a learned embedding."""
  return f"dim{embedding_dim}" if embedding == "learned" else embedding


def row_id(dataset: str, method: str, embedding: str, embedding_dim: int) -> str:
  return f"{dataset}/{method}/{embedding_label(embedding, embedding_dim)}"


def row_dirname(rid: str) -> str:
  return rid.replace("/", "_")


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the paper's tables; `overrides`: further RunConfig settings (tests)."""

  dataset: str
  method: str
  embedding: str
  embedding_dim: int = 20  # learned only; one-hot and prototype take theirs from the dataset
  paper: float | None = None  # the paper's test accuracy (%), None where not available
  table: int = 1
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def id(self) -> str:
    return row_id(self.dataset, self.method, self.embedding, self.embedding_dim)

  def config(self, **overrides: Any) -> RunConfig:
    """RunConfig.create's defaults for the row, then `overrides` (None: keep the default).
    The embedding is a setting of the methods that have one (the adjoint's is one-hot)."""
    emb = {}
    if "embedding" in method_settings(self.method):
      emb = dict(embedding=self.embedding,
                 embedding_dim=self.embedding_dim if self.embedding == "learned" else None)
    elif self.embedding != "onehot":
      raise ValueError(f"{self.method} has the fixed one-hot embedding, not {self.embedding}")
    return RunConfig.create(self.method, dataset=self.dataset,
                            **{**emb, **dict(self.overrides), **overrides})


def _table_rows(table: int, datasets: Sequence[str]) -> list[Row]:
  rows = []
  for ds in datasets:
    for method in PAPER_METHODS[table]:
      paper = PAPER_TABLE1.get((ds, method), (None, None, None))
      # A method without an embedding setting has the fixed one-hot one.
      embeddings = EMBEDDING_LABELS if "embedding" in method_settings(method) else ("onehot",)
      for label in embeddings:
        emb = "learned" if label == "dim20" else label
        rows.append(Row(ds, method, emb, paper=paper[EMBEDDING_LABELS.index(label)], table=table))
  return rows


TABLE1 = _table_rows(1, ("mnist", "cifar10", "cifar100"))
TABLE2 = _table_rows(2, ("tiny_imagenet",))  # the paper's figures: not available offline
ROWS = TABLE1 + TABLE2
PAPER = {r.id: r.paper for r in ROWS}


def select_rows(patterns: Iterable[str], rows: Sequence[Row] = ROWS) -> list[Row]:
  """Rows matching ids, globs ('mnist/*', '*/dt/*') or 'table1' / 'table2' / 'all', in
  table order; a pattern matching nothing raises ValueError listing the ids."""
  chosen = set()
  for pat in patterns:
    if pat in ("table1", "table2"):
      hits = {r.id for r in rows if r.table == int(pat[-1])}
    elif pat == "all":
      hits = {r.id for r in rows}
    else:
      hits = {r.id for r in rows if fnmatch.fnmatchcase(r.id, pat)}
    if not hits:
      raise ValueError(f"no row matches {pat!r}; rows are table1, table2, all, a glob, or one "
                       f"of: {' '.join(r.id for r in rows)}")
    chosen |= hits
  return [r for r in rows if r.id in chosen]


# ----------------------------------------------------------------------------- data

def subset(ds: data.Dataset, train_size: int | None = None,
           test_size: int | None = None) -> data.Dataset:
  """The first train_size training and test_size test images (copies; None: all)."""
  cut = lambda s, n: s if n is None else data.Split(s.images[:n].copy(), s.labels[:n].copy())
  note = [f"first {n} {w}" for n, w in ((train_size, "train"), (test_size, "test")) if n is not None]
  source = f"{ds.source} ({', '.join(note)})" if note else ds.source
  return dataclasses.replace(ds, train=cut(ds.train, train_size), test=cut(ds.test, test_size),
                             source=source)


def dataset_dir(data_dir: str | None, name: str) -> str | None:
  """DIR/<name> if it exists, else DIR itself (it may hold the dataset's files directly)."""
  if data_dir is None or name == "digits":
    return None
  sub = Path(data_dir) / name
  return str(sub) if sub.is_dir() else str(data_dir)


class Datasets:
  """Each dataset loaded once (from data_dir, else TFDS) and cut to train_size / test_size.

  `preloaded`: datasets already in memory (by their `name`), cut the same way.
  A dataset that fails to load raises the same error on every later request.
  """

  def __init__(self, data_dir: str | None = None, verify: bool = True,
               train_size: int | None = None, test_size: int | None = None,
               preloaded: Iterable[data.Dataset] = ()):
    self.data_dir, self.verify = data_dir, verify
    self.train_size, self.test_size = train_size, test_size
    self._cache: dict[str, data.Dataset | Exception] = {
        ds.name: subset(ds, train_size, test_size) for ds in preloaded}

  def get(self, name: str) -> data.Dataset:
    if name not in self._cache:
      try:
        ds = data.load(name, dataset_dir(self.data_dir, name), verify=self.verify)
        self._cache[name] = subset(ds, self.train_size, self.test_size)
      except Exception as e:  # missing files, bad checksum, unknown dataset, no TFDS
        self._cache[name] = e
    got = self._cache[name]
    if isinstance(got, Exception):
      raise got
    return got


# ----------------------------------------------------------------------------- training

def run_rows(rows: Sequence[Row], out_dir: str | Path, datasets: Datasets, seeds: int = 3,
             inference_runs: int = 5, epochs: int | None = None,
             inference_steps: int | None = None,
             print_fn: Callable[[str], None] = print) -> list[str]:
  """Train every (row, seed) not finished yet in OUT/runs/<row>/seed<k>; returns the ids of
  the rows that failed (each failure is printed, and the other rows go on)."""
  from noprop_jax import trainer

  failed = []
  for row in rows:
    for seed in range(seeds):
      steps = inference_steps if "inference_steps" in method_settings(row.method) else None
      workdir = Path(out_dir) / "runs" / row_dirname(row.id) / f"seed{seed}"
      tag = f"[{row.id} seed {seed}]"
      try:
        cfg = row.config(seed=seed, epochs=epochs, inference_runs=inference_runs,
                         inference_steps=steps)
        if (workdir / "summary.json").exists():
          saved = flat_config(json.loads((workdir / "summary.json").read_text())["config"])
          now = flat_config(cfg.to_dict())
          diff = sorted(k for k in set(now) | set(saved) if saved.get(k) != now.get(k))
          print_fn(f"{tag} done already" + (f" (with other {', '.join(diff)}: kept; delete "
                                            f"{workdir} to retrain)" if diff else ""))
          continue
        ds = datasets.get(row.dataset)
        s = trainer.train(cfg, workdir, dataset=ds, progress=False,
                          print_fn=lambda m: print_fn(f"{tag} {m}"))
        print_fn(f"{tag} test accuracy: mean path {s['test_accuracy_mean_path']:.4f}, sampled "
                 f"{s['test_accuracy_stochastic']:.4f}, {s['train_seconds']:.0f} s of training")
      except Exception as e:  # one row's failure (data, not implemented, NaN) stops only it
        print_fn(f"{tag} error: {type(e).__name__}: {e}")
        failed.append(row.id)
        break
  return failed


# ----------------------------------------------------------------------------- reading runs

def flat_config(d: dict[str, Any]) -> dict[str, Any]:
  """Every setting by its (unique) name, from a `RunConfig.to_dict` (a run's config.json,
  a summary's config), which groups them by concern; a flat dict passes through."""
  if isinstance(d.get("train"), dict):
    return {"method": d["method"], **d.get("model", {}), **d.get("block", {}),
            **d.get("data", {}), **d["train"]}
  return dict(d)

@dataclasses.dataclass(frozen=True)
class Run:
  row: str
  seed: int
  path: Path
  config: dict[str, Any]
  summary: dict[str, Any] | None  # None while unfinished
  metrics: list[dict[str, Any]]


def read_runs(out_dir: str | Path) -> dict[str, list[Run]]:
  """Every run under OUT/runs/*/seed*/ with a config.json, by row id (table order, then
  others by id), each row's runs by seed."""
  runs: dict[str, list[Run]] = {}
  for cfg_path in sorted(Path(out_dir).glob("runs/*/*/config.json")):
    d = cfg_path.parent
    cfg = flat_config(run_files.read_config(cfg_path)[0])
    summ = d / "summary.json"
    mpath = d / "metrics.jsonl"
    metrics = run_files.read_records(mpath)  # the epochs' (not a stopped run's last line)
    # Settings left at their defaults are absent: one-hot (always, for the adjoint).
    rid = row_id(cfg["dataset"], cfg["method"], cfg.get("embedding", "onehot"),
                 cfg.get("embedding_dim", 0))
    runs.setdefault(rid, []).append(Run(rid, int(cfg["seed"]), d, cfg,
                                        json.loads(summ.read_text()) if summ.exists() else None,
                                        metrics))
  order = {r.id: i for i, r in enumerate(ROWS)}
  ids = sorted(runs, key=lambda r: (order.get(r, len(order)), r))
  return {r: sorted(runs[r], key=lambda run: run.seed) for r in ids}


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and standard error (sample std, ddof=1, over sqrt(n)); s.e. None when n == 1."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)


def fmt_pct(values: Sequence[float]) -> str:
  """Fractions -> 'mean ± s.e.' in percent, 2 decimals ('n/a' if empty)."""
  if not len(values):
    return "n/a"
  m, se = mean_se([100 * v for v in values])
  return f"{m:.2f}" if se is None else f"{m:.2f} ± {se:.2f}"


def fmt_duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 3 * 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def _spread(values: Iterable[Any]) -> str:
  vals = sorted(set(values))
  return str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}"


def results_table(out_dir: str | Path) -> str:
  """results.md: one line per row found in OUT/runs (finished seeds only), with the paper's
  figure, and the commands recorded in OUT/commands.txt. Reads files only."""
  lines = ["# NoProp: reproduction of the paper's Tables 1 and 2", "",
           "Test accuracy (%). *Mean path*: deterministic inference (z_0 = 0, no noise), mean "
           "± standard error over seeds. *Sampled*: the paper's stochastic inference, mean ± "
           "s.e. over all seeds x inference runs. Paper: Li, Teh & Pascanu (2025), Table 1 "
           "(Table 2, Tiny ImageNet: n/a, not available offline).", "",
           "| row | paper | ours: mean path | ours: sampled | seeds | epochs | train / test "
           "images | train time / seed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  unfinished = []
  for rid, runs in read_runs(out_dir).items():
    done = [r.summary for r in runs if r.summary is not None]
    unfinished += [f"{rid} seed {r.seed} ({len(r.metrics)}/{r.config['epochs']} epochs)"
                   for r in runs if r.summary is None]
    if not done:
      continue
    paper = PAPER.get(rid)
    mean_path = [s["test_accuracy_mean_path"] for s in done]
    sampled = [a for s in done for a in s["test_accuracy_stochastic_runs"]]
    images = _spread(f"{s.get('n_train', '?')} / {s.get('n_test', '?')}" for s in done)
    secs = float(np.mean([s["train_seconds"] for s in done]))
    lines.append(f"| {rid} | {'n/a' if paper is None else f'{paper:.2f}'} | {fmt_pct(mean_path)} "
                 f"| {fmt_pct(sampled)} | {len(done)} | {_spread(s['epochs'] for s in done)} "
                 f"| {images} | {fmt_duration(secs)} |")
  if unfinished:
    lines += ["", "Unfinished (not in the table): " + "; ".join(unfinished) + "."]
  cmds = Path(out_dir) / "commands.txt"
  commands = [c for c in cmds.read_text().splitlines() if c.strip()] if cmds.exists() else []
  if commands:
    lines += ["", "Produced by:", ""] + [f"    {c}" for c in commands]
  return "\n".join(lines) + "\n"


def accuracy_curves(runs: Sequence[Run]) -> dict[str, np.ndarray]:
  """Mean over seeds of test accuracy (%) at the evaluated epochs all seeds have, with the
  cumulative training seconds (sum of every epoch's `seconds` up to it)."""
  per_seed = []
  for r in runs:
    cum = np.cumsum([m.get("seconds", 0.0) for m in r.metrics])
    per_seed.append({m["epoch"]: (c, 100 * m["test_accuracy"])
                     for m, c in zip(r.metrics, cum) if "test_accuracy" in m})
  per_seed = [p for p in per_seed if p]
  epochs = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
  vals = np.array([[p[e] for e in epochs] for p in per_seed]).reshape(len(per_seed), len(epochs), 2)
  return {"epoch": np.array(epochs), "seconds": vals[..., 0].mean(0) if epochs else np.zeros(0),
          "accuracy": vals[..., 1].mean(0) if epochs else np.zeros(0)}


# ----------------------------------------------------------------------------- plots

def plot_accuracy(curves: dict[str, dict[str, np.ndarray]], path: str | Path) -> None:
  """Two panels: test accuracy against epoch and against cumulative training time."""
  fig = Figure(figsize=(13, 5), layout="constrained")
  ax_e, ax_t = fig.subplots(1, 2)
  t_max = max([c["seconds"].max() for c in curves.values() if len(c["seconds"])], default=0)
  unit, scale = (("h", 3600) if t_max > 3 * 3600 else ("min", 60) if t_max > 300 else ("s", 1))
  colors = matplotlib.colormaps["tab20"]
  for i, (rid, c) in enumerate(curves.items()):
    style = dict(marker="o", markersize=3, color=colors(i % 20), label=rid,
                 linestyle=("-", "--", ":")[(i // 20) % 3])
    ax_e.plot(c["epoch"], c["accuracy"], **style)
    ax_t.plot(c["seconds"] / scale, c["accuracy"], **style)
  ax_e.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy vs epoch")
  ax_t.set(xlabel=f"training time ({unit})", ylabel="test accuracy (%)",
           title="test accuracy vs training time")
  for ax in (ax_e, ax_t):
    ax.grid(alpha=0.3)
  if curves:
    ax_t.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.savefig(path, dpi=100)


def _show_image(ax, img: np.ndarray, normalize: bool = False) -> None:
  img = np.asarray(img, np.float32)
  if normalize:  # embeddings leave [0, 1] as they learn: stretch each tile
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
  elif img.max() > 1.0:  # uint8 pixels
    img = img / 255.0
  img = np.clip(img, 0.0, 1.0)
  if img.shape[-1] == 1:
    ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  else:
    ax.imshow(img)
  ax.set_xticks([])
  ax.set_yticks([])


def _grid(n: int) -> tuple[int, int]:
  cols = math.ceil(math.sqrt(n))
  return math.ceil(n / cols), cols


def plot_embeddings(W: np.ndarray, image_shape: Sequence[int], path: str | Path,
                    title: str = "", max_classes: int = 100) -> None:
  """Class embeddings W [m, H*W*C] as images, one tile per class (the first max_classes)."""
  W = np.asarray(W)[:max_classes]
  rows, cols = _grid(len(W))
  fig = Figure(figsize=(1.1 * cols, 1.1 * rows + 0.4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for k, ax in enumerate(axes):
    if k < len(W):
      _show_image(ax, W[k].reshape(image_shape), normalize=True)
      ax.set_title(str(k), fontsize=7)
    else:
      ax.axis("off")
  fig.suptitle(title or "class embeddings")
  fig.savefig(path, dpi=100)


def plot_predictions(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                     path: str | Path, title: str = "", n: int = 36) -> None:
  """The first n images with 'prediction (true label)'; errors in a red frame and title."""
  images, labels, predictions = images[:n], np.asarray(labels)[:n], np.asarray(predictions)[:n]
  rows, cols = _grid(len(images))
  fig = Figure(figsize=(1.4 * cols, 1.5 * rows + 0.4), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for k, ax in enumerate(axes):
    if k >= len(images):
      ax.axis("off")
      continue
    _show_image(ax, images[k])
    wrong = predictions[k] != labels[k]
    color = "red" if wrong else "black"
    ax.set_title(f"{predictions[k]} ({labels[k]})", fontsize=8, color=color)
    for spine in ax.spines.values():
      spine.set_edgecolor(color)
      spine.set_linewidth(2.5 if wrong else 0.5)
  errors = int((predictions != labels).sum())
  fig.suptitle(f"{title}: prediction (true label), {errors}/{len(images)} wrong".lstrip(": "))
  fig.savefig(path, dpi=100)


def write_report(out_dir: str | Path, datasets: Datasets | None = None,
                 print_fn: Callable[[str], None] = print) -> str:
  """OUT/results.md and OUT/plots/*.png from the run directories; returns the table.

  The embedding and prediction plots load each row's first finished seed's checkpoint;
  predictions need its test images (rows whose dataset fails to load are skipped).
  """
  out_dir = Path(out_dir)
  table = results_table(out_dir)
  (out_dir / "results.md").write_text(table)
  plots = out_dir / "plots"
  plots.mkdir(parents=True, exist_ok=True)
  runs = read_runs(out_dir)
  curves = {rid: accuracy_curves(rs) for rid, rs in runs.items()}
  plot_accuracy({k: c for k, c in curves.items() if len(c["epoch"])}, plots / "accuracy.png")

  try:
    import jax
    import jax.numpy as jnp
    from noprop_jax import core, trainer
  except ImportError as e:
    print_fn(f"embedding and prediction plots skipped: {e}")
    return table
  for rid, rs in runs.items():
    first = next((r for r in rs if r.summary is not None), None)
    if first is None:
      continue
    name = row_dirname(rid)
    try:
      cfg, model, state, _ = trainer.load_run(first.path)
      seed = cfg.train.seed
      if cfg.model.get("embedding") == "prototype":
        # W_embed: DT keeps it with the head ('shared'), the other methods in 'params'.
        W = np.asarray(core.embedding_matrix(state.get("shared", state.get("params")),
                                             model.num_classes))
        plot_embeddings(W, model.input_shape, plots / f"embeddings_{name}.png",
                        f"class embeddings, {rid} (seed {seed})")
      if datasets is None:
        continue
      test = datasets.get(cfg.data.dataset).test
      x, y = test.images[:36], test.labels[:36]
      mode = cfg.train.inference
      key = jax.random.key(seed) if mode == "stochastic" else None
      scores = cfg.method_record.predict(model, state, jnp.asarray(x), key, mode)
      pred = np.asarray(scores.argmax(-1))
      plot_predictions(x, y, pred, plots / f"predictions_{name}.png", f"{rid} (seed {seed})")
    except Exception as e:  # a missing dataset or an unreadable checkpoint skips its plots only
      print_fn(f"[{rid}] plots skipped: {type(e).__name__}: {e}")
  return table


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--rows", nargs="+", default=None, help="row ids, globs ('mnist/*'), table1, table2 or all")
  a("--seeds", type=int, default=3, help="seeds 0..N-1 per row (default 3)")
  a("--inference-runs", type=int, default=5, help="sampled inference runs per seed (default 5)")
  a("--epochs", type=int, default=None, help="override the paper's epochs (short runs)")
  a("--train-size", type=int, default=None, help="use only the first N training images")
  a("--test-size", type=int, default=None, help="use only the first N test images")
  a("--inference-steps", type=int, default=None, help="CT/FM/adjoint: Euler steps (default 1000)")
  a("--data-dir", default=None, help="DIR/<dataset>/ or the dataset's own files; else TFDS")
  a("--no-verify", action="store_true", help="skip checksum verification of --data-dir files")
  a("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
  a("--report-only", action="store_true", help="only rebuild results.md and plots from OUT")
  a("--list", action="store_true", help="list the rows and exit")
  return p.parse_args(argv)


def list_rows(rows: Sequence[Row] = ROWS) -> str:
  lines = [f"{'row':<32} {'table':>5} {'paper':>6} {'epochs':>6}"]
  for r in rows:
    paper = "n/a" if r.paper is None else f"{r.paper:.2f}"
    lines.append(f"{r.id:<32} {r.table:>5} {paper:>6} {r.config().train.epochs:>6}")
  return "\n".join(lines)


def _record_command(out_dir: Path, argv: Sequence[str]) -> None:
  cmd = shlex.join(["python", "experiments/reproduce.py", *argv])
  path = out_dir / "commands.txt"
  seen = path.read_text().splitlines() if path.exists() else []
  if cmd not in seen:
    path.write_text("".join(c + "\n" for c in seen + [cmd]))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.list:
    print(list_rows())
    return 0
  for name in ("seeds", "inference_runs", "epochs", "train_size", "test_size", "inference_steps"):
    v = getattr(args, name)
    if v is not None and v < 1:
      print(f"error: --{name.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
      return 2
  if not args.report_only and not args.rows:
    print("error: give --rows (ids, globs such as 'mnist/*', table1, table2), or "
          "--report-only; --list shows the rows", file=sys.stderr)
    return 2
  try:
    rows = select_rows(args.rows) if args.rows else []
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  _record_command(out, argv)
  datasets = Datasets(args.data_dir, not args.no_verify, args.train_size, args.test_size)
  failed = []
  if not args.report_only:
    failed = run_rows(rows, out, datasets, seeds=args.seeds, inference_runs=args.inference_runs,
                      epochs=args.epochs, inference_steps=args.inference_steps)
  print(write_report(out, datasets))
  print(f"wrote {out / 'results.md'} and {out / 'plots'}/")
  if failed:
    print(f"error: rows that failed: {' '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
