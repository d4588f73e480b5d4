"""Does block-local training forget less? Tasks trained one after another, every method.

  python experiments/continual.py --data-dir ../shared/data/mnist --methods dt fm backprop \\
      --blocks mlp paper --seeds 3 --out runs/continual
  python experiments/continual.py --scenario permuted --tasks 10 --data-dir ../shared/data/mnist
  python experiments/continual.py --dataset digits --steps-per-task 40 --out runs/continual_digits

Split (`--scenario split`): the classes in pairs, 0/1, 2/3, ... (5 tasks on MNIST). One
run is scored two ways: task-incremental (the prediction restricted to the classes of the
task being tested; the task is known) and class-incremental (one prediction over all
classes; no task identity). Permuted (`--scenario permuted`): `--tasks` fixed pixel
permutations of the whole dataset, every task with all classes (seeded; one score).

A method trains on task 1, then task 2, ... with its optimizer state and everything else
carried over, as a user fine-tuning a model would: no replay, no regularisation. After
each task it is tested on every task: R[i, j] = test accuracy on task j after training
task i (mean path). From R: average accuracy ACC = mean_j R[T, j]; backward transfer
BWT = mean_{j<T} (R[T, j] - R[j, j]); forgetting = mean_{j<T} (max_{l<T} R[l, j] -
R[T, j]). The joint upper bound trains the same model on all tasks at once for the same
number of steps and is tested on each task. Method `plain` is the literature's reference,
a plain 2 x 400 MLP classifier trained by back-propagation, to check the protocol
against the published fine-tuning figures.

OUT/results.md (mean ± standard error over seeds), OUT/results.json (every R matrix),
OUT/plots/accuracy.png (accuracy on each task as tasks are learnt, one panel per
method and block) and OUT/plots/R_<scenario>.png (the final R matrices, seed 0); --results
FILE the rows as a results file (command, date, machine, versions and settings beside them).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from noprop_jax import core, data, host_memory, trainer
from noprop_jax import method as methods
from noprop_jax.config import RunConfig, method_settings
import results as results_file  # experiments/ (the script's folder) is on sys.path
from reproduce import Datasets, fmt_pct

SCENARIOS = ("split", "permuted")
PLAIN = "plain"  # the literature's plain MLP classifier, trained by backprop (`PlainLearner`)
PLAIN_MH = "plain_multihead"  # the same with one output head per task (task-incremental training)
EVAL_BATCH = 1000


# ----------------------------------------------------------------------------- tasks

@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its training and test inputs and labels, and the classes it holds."""

  train: data.Split
  test: data.Split
  classes: tuple[int, ...]


def split_tasks(ds: data.Dataset, classes_per_task: int = 2) -> list[Task]:
  """Consecutive classes in groups (0/1, 2/3, ...): every example of a group's classes."""
  m = ds.num_classes
  if m % classes_per_task:
    raise ValueError(f"{m} classes do not split into tasks of {classes_per_task}")
  tasks = []
  for k in range(m // classes_per_task):
    cls = tuple(range(k * classes_per_task, (k + 1) * classes_per_task))
    pick = lambda s: data.Split(s.images[np.isin(s.labels, cls)], s.labels[np.isin(s.labels, cls)])
    tasks.append(Task(pick(ds.train), pick(ds.test), cls))
  return tasks


def permutations(n_tasks: int, size: int, seed: int) -> np.ndarray:
  """[n_tasks, size]: a fixed, seeded pixel permutation per task."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(size) for _ in range(n_tasks)])


def permuted_tasks(ds: data.Dataset, n_tasks: int, seed: int = 0) -> list[Task]:
  """The whole dataset under `n_tasks` fixed pixel permutations, all classes in each."""
  shape = ds.train.images.shape[1:]
  perms = permutations(n_tasks, math.prod(shape), seed)
  permute = lambda s, p: data.Split(s.images.reshape(len(s.images), -1)[:, p].reshape(-1, *shape),
                                    s.labels)
  every = tuple(range(ds.num_classes))
  return [Task(permute(ds.train, p), permute(ds.test, p), every) for p in perms]


def make_tasks(ds: data.Dataset, scenario: str, n_tasks: int, seed: int) -> list[Task]:
  core.check_choice("scenario", scenario, SCENARIOS)
  return split_tasks(ds) if scenario == "split" else permuted_tasks(ds, n_tasks, seed)


# ----------------------------------------------------------------------------- metrics

def average_accuracy(R: np.ndarray) -> float:
  """ACC = mean_j R[T, j]: every task's accuracy after the last."""
  return float(np.mean(R[-1]))


def backward_transfer(R: np.ndarray) -> float:
  """BWT = mean_{j<T} (R[T, j] - R[j, j]): what learning later tasks did to earlier ones."""
  T = len(R)
  return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)])) if T > 1 else 0.0


def forgetting(R: np.ndarray) -> float:
  """mean_{j<T} (max_{l<T} R[l, j] - R[T, j]): the drop from each task's best accuracy."""
  T = len(R)
  return float(np.mean([R[:-1, j].max() - R[-1, j] for j in range(T - 1)])) if T > 1 else 0.0


def restricted_predictions(logits: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
  """The argmax over `classes` only (task-incremental: the task is known)."""
  cls = np.asarray(classes)
  return cls[np.argmax(logits[:, cls], axis=-1)]


# ----------------------------------------------------------------------------- one run

class Learner:
  """A method's model, jitted step and predict for one (method, block), shared by seeds."""

  multihead = False  # one output head per task (`PlainLearner` only)
  T = None  # blocks, where the method has a number of blocks

  def __init__(self, method: str, block: str, ds: data.Dataset, batch_size: int, lr: float,
               inference_steps: int | None, T: int | None = None):
    settings = dict(block=block, batch_size=batch_size, lr=lr)
    if "inference_steps" in method_settings(method) and inference_steps:
      settings["inference_steps"] = inference_steps
    has_T = "T" in method_settings(method)  # the continuous-time methods have no blocks count
    if T and has_T:
      settings["T"] = T
    self.cfg = RunConfig.create(method, **settings)
    self.T = self.cfg.T if has_T else None  # in results.json
    self.batch_size = batch_size
    self.mod = methods.get(method)
    self.compute = trainer.resolve_compute(self.cfg)
    self.model = trainer.build_model(self.cfg, ds.train.images.shape[1:], ds.num_classes,
                                     self.compute)
    self.step = jax.jit(partial(self.mod.train_step, self.model, self.cfg.train.optim, self.compute),
                        donate_argnums=0)
    self.logits = jax.jit(lambda state, x: self.mod.predict(self.model, state, x))

  def init(self, seed: int, inputs: np.ndarray, labels: np.ndarray):
    return trainer.init_state(dataclasses.replace(self.cfg, train=dataclasses.replace(
        self.cfg.train, seed=seed)), self.model, jax.random.key(seed), inputs, labels)

  def train(self, state, split: data.Split, steps: int, rng: np.random.Generator):
    """`steps` steps on batches drawn without replacement, pass after pass. Returns (state,
    the number of updates the method's step dropped as non-finite: its metrics' 'skipped',
    counted on the device so that no step waits for the host)."""
    B, n = self.batch_size, len(split.labels)
    order = np.empty(0, np.int64)
    skipped = jnp.zeros((), jnp.int32)
    for _ in range(steps):
      if len(order) < B:
        order = np.concatenate([order, rng.permutation(n)])
      idx, order = order[:B], order[B:]
      state, m = self.step(state, split.images[idx], split.labels[idx])
      skipped = skipped + m.get("skipped", 0)
    if steps and not math.isfinite(float(m["loss"])):
      raise FloatingPointError(f"{self.cfg.method}: the training loss is not finite")
    return state, int(skipped)

  def predict(self, state, images: np.ndarray) -> np.ndarray:
    """Logits for every image, in fixed-size batches (the last one padded)."""
    out = []
    for i in range(0, len(images), EVAL_BATCH):
      x = images[i:i + EVAL_BATCH]
      pad = EVAL_BATCH - len(x)
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
      out.append(np.asarray(self.logits(state, x))[:EVAL_BATCH - pad])
    return np.concatenate(out)


class PlainLearner(Learner):
  """The literature's reference network: a plain classifier (flattened input, two hidden
  layers of 400 ReLU units, a linear output) trained end to end on cross-entropy with
  Adam. The published split-MNIST fine-tuning figures are for this network; it checks
  the protocol against them, apart from the library's backprop baseline, whose chain of
  softmax(block) @ W links is another network.

  With `task_of` (the task of each class), the output is multi-headed, as in the
  published task-incremental figures: an example's cross-entropy is over its own task's
  classes only, so training a task never pushes down another task's outputs. Every other
  learner has one shared head: all classes compete in every loss.
  """

  def __init__(self, ds: data.Dataset, batch_size: int, lr: float, hidden: int = 400,
               task_of: np.ndarray | None = None):
    import flax.linen as nn
    import optax

    m = ds.num_classes

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for _ in range(2):
          h = nn.relu(nn.Dense(hidden)(h))
        return nn.Dense(m)(h)

    self.net, self.opt, self.batch_size = MLP(), optax.adam(lr), batch_size
    self.multihead = task_of is not None
    task_of = None if task_of is None else jnp.asarray(task_of)
    logits = lambda params, x: self.net.apply(params, core.to_float(x))

    def loss_fn(params, x, y):
      logits_BM = logits(params, x)
      if task_of is not None:  # multi-head: only the outputs of the example's own task
        own_BM = task_of[y][:, None] == task_of[None, :]
        logits_BM = jnp.where(own_BM, logits_BM, -1e9)
      return core.cross_entropy(logits_BM, y)

    def step(state, x, y):
      loss, g = jax.value_and_grad(loss_fn)(state["params"], x, y)
      upd, opt = self.opt.update(g, state["opt"], state["params"])
      return {"params": optax.apply_updates(state["params"], upd), "opt": opt}, {"loss": loss}

    self.step = jax.jit(step, donate_argnums=0)
    self.logits = jax.jit(lambda state, x: logits(state["params"], x))

  def init(self, seed: int, inputs: np.ndarray, labels: np.ndarray):
    params = self.net.init(jax.random.key(seed), jnp.zeros((1, *inputs.shape[1:]), jnp.float32))
    return {"params": params, "opt": self.opt.init(params)}


def task_of_class(tasks: list[Task], num_classes: int) -> np.ndarray:
  """[num_classes]: the task holding each class (split tasks are disjoint)."""
  out = np.full(num_classes, -1, np.int32)
  for k, task in enumerate(tasks):
    out[list(task.classes)] = k
  return out


def make_learner(method: str, block: str, ds: data.Dataset, tasks: list[Task], args) -> Learner:
  if method == PLAIN:
    return PlainLearner(ds, args.batch_size, args.lr)
  if method == PLAIN_MH:
    return PlainLearner(ds, args.batch_size, args.lr,
                        task_of=task_of_class(tasks, ds.num_classes))
  return Learner(method, block, ds, args.batch_size, args.lr, args.inference_steps, args.T)


def score(learner: Learner, state, tasks: list[Task], scenario: str) -> dict[str, np.ndarray]:
  """Accuracy on every task's test split, per way of scoring: [n_tasks] each."""
  out = {"class_il" if scenario == "split" else "domain_il": [], "task_il": []}
  for task in tasks:
    logits = learner.predict(state, task.test.images)
    y = task.test.labels
    out[next(iter(out))].append(float(np.mean(np.argmax(logits, -1) == y)))
    out["task_il"].append(float(np.mean(restricted_predictions(logits, task.classes) == y)))
  if scenario == "permuted":
    del out["task_il"]  # every task has every class: the restriction changes nothing
  if learner.multihead:
    del out["class_il"]  # the heads were never trained against each other
  return {k: np.asarray(v) for k, v in out.items()}


def run_sequence(learner: Learner, tasks: list[Task], scenario: str, steps_per_task: int,
                 seed: int) -> tuple[dict[str, np.ndarray], int]:
  """Train task after task; (R[i, j] for each way of scoring, updates skipped as non-finite)."""
  rng = np.random.default_rng(seed)
  first = tasks[0].train
  state = learner.init(seed, first.images, first.labels)
  rows: dict[str, list] = {}
  skipped = 0
  for task in tasks:
    state, n = learner.train(state, task.train, steps_per_task, rng)
    skipped += n
    for k, acc in score(learner, state, tasks, scenario).items():
      rows.setdefault(k, []).append(acc)
  return {k: np.stack(v) for k, v in rows.items()}, skipped


def run_joint(learner: Learner, tasks: list[Task], scenario: str, steps: int,
              seed: int) -> tuple[dict[str, np.ndarray], int]:
  """All tasks at once for `steps` steps: the upper bound. (Accuracy on each task, updates
  skipped as non-finite.)"""
  joint = data.Split(np.concatenate([t.train.images for t in tasks]),
                     np.concatenate([t.train.labels for t in tasks]))
  rng = np.random.default_rng(seed + 10_000)
  state, skipped = learner.train(learner.init(seed, joint.images, joint.labels), joint, steps, rng)
  return score(learner, state, tasks, scenario), skipped


# ----------------------------------------------------------------------------- report

def metrics(R: np.ndarray) -> dict[str, float]:
  return {"acc": average_accuracy(R), "bwt": backward_transfer(R), "forgetting": forgetting(R)}


NAMES = {**{m.name: m.title for m in methods.registered()}, PLAIN: "Plain MLP, backprop (reference)",
         PLAIN_MH: "Plain MLP, backprop, one head per task (reference)"}
SCORING = {"class_il": "class-incremental", "task_il": "task-incremental",
           "domain_il": "permuted (all classes)"}


def table(results: list[dict]) -> str:
  rows = ["| scenario | method | block | steps / task | ACC | BWT | forgetting | joint | seeds | "
          "skipped updates |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    for k, Rs in r["R"].items():
      m = [metrics(np.asarray(R)) for R in Rs]
      joint = [float(np.mean(j)) for j in r["joint"][k]]
      rows.append(f"| {SCORING[k]} | {NAMES[r['method']]} | {r['block']} | {r['steps_per_task']} | "
                  f"{fmt_pct([x['acc'] for x in m])} | {fmt_pct([x['bwt'] for x in m])} | "
                  f"{fmt_pct([x['forgetting'] for x in m])} | {fmt_pct(joint)} | {len(Rs)} | "
                  f"{_skipped(r)} |")
  return "\n".join(rows)


def _skipped(r: dict) -> str:
  """Updates dropped as non-finite, over every seed's sequential and joint runs, of all the
  steps taken ('n/a' for a results file written before they were counted)."""
  if "skipped_updates" not in r:
    return "n/a"
  return f"{r['skipped_updates']} of {r['updates']}"


def plot(results: list[dict], out_dir: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.figure import Figure

  (out_dir / "plots").mkdir(parents=True, exist_ok=True)
  panels = [(r, k) for r in results for k in r["R"]]
  fig = Figure(figsize=(4 * len(panels), 3.2))
  for i, (r, k) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    R = np.mean(np.asarray(r["R"][k]), axis=0)  # mean over seeds
    for j in range(R.shape[1]):
      ax.plot(np.arange(j, len(R)) + 1, 100 * R[j:, j], marker="o", label=f"task {j + 1}")
    ax.set(title=f"{r['method']} {r['block']}: {SCORING[k]}", xlabel="tasks trained",
           ylabel="test accuracy (%)", ylim=(0, 101))
  fig.axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_dir / "plots" / "accuracy.png", dpi=110)
  fig = Figure(figsize=(3.2 * len(panels), 3))
  for i, (r, k) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    R = np.asarray(r["R"][k][0])
    ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
    for (a, b), v in np.ndenumerate(R):
      ax.text(b, a, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="w")
    ax.set(title=f"{r['method']} {r['block']}: {SCORING[k]}", xlabel="tested on task",
           ylabel="after task")
  fig.tight_layout()
  fig.savefig(out_dir / "plots" / f"R_{results[0]['scenario']}.png", dpi=110)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="mnist", help="mnist (default), fashion_mnist, digits (embedded), ...")
  p.add_argument("--data-dir", default=None, help="the dataset's original files (else TFDS)")
  p.add_argument("--scenario", default="split", choices=SCENARIOS)
  p.add_argument("--tasks", type=int, default=10, help="permuted: number of permutations")
  p.add_argument("--methods", nargs="+", default=["dt", "fm", "backprop", PLAIN],
                 choices=[*methods.names(), PLAIN, PLAIN_MH],
                 help=f"{PLAIN}: the literature's 2 x 400 MLP classifier; {PLAIN_MH}: the same "
                      "with one output head per task (split only; scored task-incrementally)")
  p.add_argument("--blocks", nargs="+", default=["mlp"], choices=["mlp", "paper", "vit"])
  p.add_argument("--epochs-per-task", type=float, default=1.0, help="passes over a task's training data")
  p.add_argument("--steps-per-task", type=int, default=0, help="steps per task (overrides --epochs-per-task)")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--inference-steps", type=int, default=100, help="ct, fm, adjoint: Euler steps")
  p.add_argument("--T", type=int, default=None,
                 help="blocks of the discrete-time methods (dt, backprop, ...; default: theirs, 10)")
  p.add_argument("--out", default="runs/continual")
  p.add_argument("--results", default=None, metavar="FILE",
                 help="also write the rows as a results file (JSON with command, date, machine, "
                 "versions and settings)")
  p.add_argument("--report", nargs="+", metavar="OUT", default=None,
                 help="print one table of these runs' results.json (class-incremental rows "
                      "first) and exit; trains nothing")
  return p.parse_args(argv)


def report(dirs: list[str]) -> str:
  """One table of several runs' rows: class-incremental first, then task-incremental."""
  results = []
  for d in dirs:
    f = Path(d) / "results.json"
    if not f.is_file():
      raise FileNotFoundError(f"{f} does not exist: run experiments/continual.py --out {d} first")
    results += json.loads(f.read_text())
  rows = table(results).splitlines()
  order = [SCORING[k] for k in ("class_il", "task_il", "domain_il")]
  body = sorted(rows[2:], key=lambda row: order.index(row.split(" | ")[0].lstrip("| ")))
  return "\n".join(rows[:2] + body)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.report:
    try:
      print(report(args.report))
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0
  for name in ("tasks", "seeds", "batch_size", "inference_steps"):
    if getattr(args, name) < 1:
      print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
      return 2
  if args.steps_per_task < 0 or args.epochs_per_task <= 0:
    print("error: --steps-per-task must be >= 0 and --epochs-per-task > 0", file=sys.stderr)
    return 2
  if args.scenario == "permuted" and PLAIN_MH in args.methods:
    print(f"error: {PLAIN_MH} needs tasks with their own classes (--scenario split); every "
          "permuted task has every class, so it would be plain", file=sys.stderr)
    return 2
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  try:
    ds = Datasets(args.data_dir).get(args.dataset)
    tasks = make_tasks(ds, args.scenario, args.tasks, seed=0)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  steps = args.steps_per_task or max(1, round(args.epochs_per_task * len(tasks[0].train.labels)
                                              / args.batch_size))
  print(f"{args.scenario} {ds.name}: {len(tasks)} tasks of {[len(t.train.labels) for t in tasks]} "
        f"training examples, {steps} steps per task", flush=True)
  results = []
  for method in args.methods:
    for block in args.blocks if method not in (PLAIN, PLAIN_MH) else ["2x400"]:
      t0 = time.perf_counter()
      learner = make_learner(method, block, ds, tasks, args)
      r = {"method": method, "block": block, "scenario": args.scenario, "dataset": ds.name,
           "steps_per_task": steps, "T": learner.T, "R": {}, "joint": {}, "skipped_updates": 0,
           "updates": 2 * args.seeds * steps * len(tasks)}  # sequential and joint runs
      for seed in range(args.seeds):
        Rs, skipped = run_sequence(learner, tasks, args.scenario, steps, seed)
        for k, R in Rs.items():
          r["R"].setdefault(k, []).append(R.tolist())
        accs, skipped_joint = run_joint(learner, tasks, args.scenario, steps * len(tasks), seed)
        for k, acc in accs.items():
          r["joint"].setdefault(k, []).append(acc.tolist())
        r["skipped_updates"] += skipped + skipped_joint
      r["seconds"] = time.perf_counter() - t0
      results.append(r)
      print("\n".join(table([r]).splitlines()[2:]), f"({r['seconds']:.0f} s)", flush=True)
      (out / "results.json").write_text(json.dumps(results, indent=1))
  cmd = "python experiments/continual.py " + " ".join(sys.argv[1:] if argv is None else argv)
  (out / "results.md").write_text(f"`{cmd}`\n\n{steps} steps per task, batch {args.batch_size}, "
                                  f"mean ± s.e. over {args.seeds} seeds, in %\n\n{table(results)}\n")
  plot(results, out)
  if args.results:
    results_file.write(Path(args.results), __file__, argv, results,
                       settings={k: getattr(args, k) for k in (
                           "dataset", "scenario", "tasks", "methods", "blocks", "epochs_per_task",
                           "steps_per_task", "seeds", "batch_size", "lr", "inference_steps", "T")})
  print(table(results))
  print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'plots'}/")
  return 0


if __name__ == "__main__":
  host_memory.keep_host_memory()  # on a CPU, before JAX computes anything
  sys.exit(main())
