"""experiments/continual.py: task splits and permutations, the metrics against a hand-computed
R matrix, the task-incremental restriction, and one run end to end on the digits."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import continual  # noqa: E402


def test_split_tasks_hold_exactly_their_two_classes_and_every_example(digits):
  tasks = continual.split_tasks(digits)
  assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
  for t in tasks:
    for split, full in ((t.train, digits.train), (t.test, digits.test)):
      assert set(np.unique(split.labels)) == set(t.classes)
      want = np.isin(full.labels, t.classes)
      np.testing.assert_array_equal(split.images, full.images[want])
  assert sum(len(t.train.labels) for t in tasks) == len(digits.train.labels)
  with pytest.raises(ValueError, match="do not split"):
    continual.split_tasks(digits, classes_per_task=3)


def test_permutations_are_seeded_fixed_and_applied_to_train_and_test_alike(digits):
  a, b = continual.permuted_tasks(digits, 3, seed=0), continual.permuted_tasks(digits, 3, seed=0)
  c = continual.permuted_tasks(digits, 3, seed=1)
  perms = continual.permutations(3, 64, 0)
  assert all(sorted(p) == list(range(64)) for p in perms) and len({tuple(p) for p in perms}) == 3
  for k in range(3):
    np.testing.assert_array_equal(a[k].train.images, b[k].train.images)
    assert not np.array_equal(a[k].train.images, c[k].train.images)
    flat = digits.test.images.reshape(len(digits.test.labels), -1)
    np.testing.assert_array_equal(a[k].test.images.reshape(len(flat), -1), flat[:, perms[k]])
    np.testing.assert_array_equal(a[k].train.labels, digits.train.labels)
    assert a[k].classes == tuple(range(10))


def test_metrics_against_a_hand_computed_matrix():
  R = np.array([[0.9, 0.1, 0.0],
                [0.6, 0.8, 0.2],
                [0.3, 0.5, 0.7]])
  assert continual.average_accuracy(R) == pytest.approx((0.3 + 0.5 + 0.7) / 3)
  # BWT: (R[2,0] - R[0,0] + R[2,1] - R[1,1]) / 2 = (-0.6 - 0.3) / 2
  assert continual.backward_transfer(R) == pytest.approx(-0.45)
  # forgetting: (max(0.9, 0.6) - 0.3 + max(0.1, 0.8) - 0.5) / 2 = (0.6 + 0.3) / 2
  assert continual.forgetting(R) == pytest.approx(0.45)
  # A task that improves later: BWT counts the gain, forgetting the drop from its best.
  R2 = np.array([[0.5, 0.0], [0.9, 0.8]])
  assert continual.backward_transfer(R2) == pytest.approx(0.4)
  assert continual.forgetting(R2) == pytest.approx(-0.4)
  assert continual.backward_transfer(R[:1, :1]) == continual.forgetting(R[:1, :1]) == 0.0


def test_restricted_prediction_never_leaves_the_tasks_classes():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 10)) * 5
  logits[:, 9] += 100  # the unrestricted argmax is always another task's class
  for classes in ((0, 1), (4, 5), (8, 9)):
    pred = continual.restricted_predictions(logits, classes)
    assert set(np.unique(pred)) <= set(classes)
    np.testing.assert_array_equal(pred, np.asarray(classes)[np.argmax(logits[:, list(classes)], -1)])


def test_one_run_end_to_end_on_the_digits(tmp_path):
  # Small batches and T = 2 keep the test short (its time goes into the training steps).
  argv = ["--dataset", "digits", "--methods", "dt", "plain", "--steps-per-task", "20", "--seeds", "2",
          "--T", "2", "--batch-size", "32", "--out", str(tmp_path)]
  assert continual.main(argv) == 0
  r, plain = json.loads((tmp_path / "results.json").read_text())
  assert plain["method"] == "plain" and plain["block"] == "2x400" and plain["T"] is None
  assert r["T"] == 2
  assert np.asarray(plain["R"]["class_il"][0])[-1, -1] > 0.7  # the last task is learnt
  assert set(r["R"]) == {"class_il", "task_il"} and len(r["R"]["class_il"]) == 2
  R = np.asarray(r["R"]["class_il"][0])
  assert R.shape == (5, 5)
  assert R[0, 0] > 0.8  # the first task is learnt
  assert np.all(np.triu(R, 1) == 0)  # class-incremental: unseen classes are never predicted
  T = np.asarray(r["R"]["task_il"][0])
  assert np.all(T >= R - 1e-9)  # knowing the task can only help
  assert np.mean(r["joint"]["class_il"][0]) > 0.8
  # every update of these healthy runs applied: none dropped as non-finite, of all taken
  # (5 tasks x 20 steps, sequential and joint, 2 seeds)
  assert r["skipped_updates"] == plain["skipped_updates"] == 0 and r["updates"] == 2 * 2 * 5 * 20
  md = (tmp_path / "results.md").read_text()
  assert "| class-incremental | NoProp-DT | mlp |" in md and "| task-incremental |" in md
  assert "| 2 | 0 of 400 |" in md
  assert "| class-incremental | Plain MLP, backprop (reference) | 2x400 |" in md
  # The plots: whole PNGs of one panel per row and scoring, at the figure's size and dpi
  # (accuracy: 4 x 3.2 in per panel, R matrices: 3.2 x 3 in; 110 dpi).
  panels = len(r["R"]) + len(plain["R"])
  assert _png_shape(tmp_path / "plots" / "accuracy.png") == (352, 440 * panels)
  assert _png_shape(tmp_path / "plots" / "R_split.png") == (330, 352 * panels)


def _png_shape(path: Path) -> tuple[int, int]:
  """(height, width) of a PNG file, decoded whole (a truncated or corrupt file fails)."""
  from matplotlib import image

  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
  return image.imread(path, format="png").shape[:2]


def test_multihead_training_leaves_the_other_tasks_outputs_untouched(digits):
  tasks = continual.split_tasks(digits)
  task_of = continual.task_of_class(tasks, 10)
  np.testing.assert_array_equal(task_of, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
  x, y = tasks[1].train.images[:32], tasks[1].train.labels[:32]
  heads = {}
  for name, kw in (("shared", {}), ("multi", {"task_of": task_of})):
    learner = continual.PlainLearner(digits, batch_size=32, lr=1e-2, **kw)
    state = learner.init(0, x, y)
    out0 = {k: np.asarray(v) for k, v in state["params"]["params"]["Dense_2"].items()}
    state, _ = learner.step(state, x, y)
    out1 = state["params"]["params"]["Dense_2"]
    heads[name] = {k: np.asarray(out1[k]) - out0[k] for k in out0}
  moved = lambda d, cls: np.abs(d["bias"][cls]).max() + np.abs(d["kernel"][:, cls]).max()
  others = [0, 1, 4, 5, 6, 7, 8, 9]
  assert moved(heads["multi"], others) == 0  # one head per task: task 2's loss sees only 2 and 3
  assert moved(heads["multi"], [2, 3]) > 0
  assert moved(heads["shared"], others) > 0  # one shared head: every class is pushed down


def test_multihead_rows_are_scored_task_incrementally_only_and_reports_merge_runs(tmp_path, capsys):
  argv = ["--dataset", "digits", "--methods", "plain_multihead", "--steps-per-task", "20",
          "--seeds", "1", "--out", str(tmp_path)]
  assert continual.main(argv) == 0
  (r,) = json.loads((tmp_path / "results.json").read_text())
  assert set(r["R"]) == set(r["joint"]) == {"task_il"}
  R = np.asarray(r["R"]["task_il"][0])
  assert R[-1].min() > 0.8  # every task still told apart after the last: the heads stay apart
  assert continual.main([*argv, "--scenario", "permuted"]) == 2
  capsys.readouterr()
  assert continual.main(["--report", str(tmp_path), str(tmp_path)]) == 0
  rows = capsys.readouterr().out.strip().splitlines()
  assert rows[0].startswith("| scenario | method | block | steps / task | ACC |")
  assert len(rows) == 4 and all("one head per task (reference) | 2x400 | 20 |" in r for r in rows[2:])
  assert continual.main(["--report", str(tmp_path / "missing")]) == 2
  assert "missing/results.json does not exist" in capsys.readouterr().err


def test_updates_dropped_as_non_finite_are_counted_and_reported(digits, monkeypatch):
  """The methods' steps drop a non-finite update whole and say so (metrics['skipped']);
  the protocol counts them per run, so that a row built on dropped updates shows it."""
  tasks = continual.make_tasks(digits, "split", 5, seed=0)
  learner = continual.Learner("dt", "mlp", digits, 16, 1e-3, None, T=2)
  step, calls = learner.step, []

  def flaky(state, x, y):  # every third step reports its update dropped
    state, m = step(state, x, y)
    calls.append(1)
    return state, {**m, "skipped": np.int32(len(calls) % 3 == 0)}

  monkeypatch.setattr(learner, "step", flaky)
  R, skipped = continual.run_sequence(learner, tasks, "split", 6, seed=0)
  assert len(calls) == 30 and skipped == 10 and R["class_il"].shape == (5, 5)
  accs, skipped_joint = continual.run_joint(learner, tasks, "split", 9, seed=0)
  assert skipped_joint == 3 and len(accs["class_il"]) == 5
  r = {"method": "dt", "block": "mlp", "steps_per_task": 6, "R": {"class_il": [R["class_il"].tolist()]},
       "joint": {"class_il": [accs["class_il"].tolist()]}, "skipped_updates": 13, "updates": 39}
  assert continual.table([r]).splitlines()[2].endswith("| 1 | 13 of 39 |")
  # a results file from before the count: the column says so rather than 0
  del r["skipped_updates"]
  assert continual.table([r]).splitlines()[2].endswith("| 1 | n/a |")
