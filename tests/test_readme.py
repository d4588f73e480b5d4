"""The documentation's code examples run (shrunk: T=2, one or two epochs, few solver steps):
the functional-API page's (docs/guide/functional-api.md) and the README's."""

import re
from pathlib import Path

import jax
import pytest

from noprop_jax import core, dt, fm


def _mean_path_accuracy(module, model, state, x, y) -> float:
  """The model's mean-path test accuracy as the library's evaluation counts it (eval_counts)."""
  counts = jax.jit(module.eval_counts, static_argnums=(0, 1, 6))
  compute = core.Compute().resolve(getattr(model, "T", 1))
  correct, _ = counts(model, compute, state, x, y, jax.random.key(0), 0)
  return int(correct) / len(y)


ROOT = Path(__file__).resolve().parents[1]


def test_functional_api_page_examples_run(capsys):
  text = (ROOT / "docs" / "guide" / "functional-api.md").read_text()
  dt_code, more_code = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
  assert "T=10" in dt_code and "range(15)" in dt_code
  assert "T=10" in more_code and "range(3)" in more_code and "inference_steps=100" in more_code
  scope = {}
  exec(dt_code.replace("T=10", "T=2").replace("range(15)", "range(2)"), scope)
  dt_model, dt_state = scope["model"], scope["state"]  # the second example reuses the names
  exec(more_code.replace("T=10", "T=2").replace("range(3)", "range(1)")
       .replace("inference_steps=100", "inference_steps=10"), scope)
  out = capsys.readouterr().out
  accuracies = {k: float(a) for k, a in re.findall(r"^(.*)test accuracy: (\S+)$", out, re.M)}
  assert set(accuracies) == {"", "Backprop baseline ", "NoProp-FM "}, out
  x_test, y_test = scope["x_test"], scope["y_test"]
  n = len(y_test)
  # Each is a fraction of the test digits...
  assert all(abs(a * n - round(a * n)) < 1e-6 * n for a in accuracies.values()), out
  # ... and NoProp-DT's and NoProp-FM's are the trained models' own, as the library's
  # evaluation counts them.
  assert accuracies[""] == pytest.approx(
      _mean_path_accuracy(dt, dt_model, dt_state, x_test, y_test), abs=1e-6), out
  assert accuracies["NoProp-FM "] == pytest.approx(
      _mean_path_accuracy(fm, scope["model"], scope["state"], x_test, y_test), abs=1e-6), out
  assert accuracies[""] > 0.2, out  # NoProp-DT, T=2, two epochs: above chance (0.1)
  # The test loss printed is Eq. 8's value, the sum of its three terms.
  loss = re.search(r"^loss on the test set: (\S+) \['ce', 'denoise', 'kl'\]$", out, re.M)
  assert loss and float(loss.group(1)) == float(scope["value"]), out
  assert float(scope["value"]) == pytest.approx(sum(float(v) for v in scope["terms"].values()),
                                                rel=1e-6)
  assert scope["sampled"].shape == scope["logits"].shape == (len(scope["y_test"]), 10)


def test_readme_example_runs(capsys):
  text = (ROOT / "README.md").read_text()
  (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
  assert "T=10" in code and "range(10)" in code and len(code.splitlines()) <= 25
  scope = {}
  exec(code.replace("T=10", "T=2").replace("range(10)", "range(2)"), scope)
  out = capsys.readouterr().out
  acc = float(re.search(r"^test accuracy: (\S+)$", out, re.M).group(1))
  x, y, n = scope["x"], scope["y"], len(scope["y"]) - 1500
  assert scope["logits"].shape == (n, 10)
  assert abs(acc * n - round(acc * n)) < 1e-6 * n  # a fraction of the test digits...
  # ... and the trained model's own, as the library's evaluation counts it
  assert acc == pytest.approx(_mean_path_accuracy(dt, scope["model"], scope["state"], x[1500:],
                                                  y[1500:]), abs=1e-6)
  assert acc > 0.2, out  # T=2, two epochs: above chance (0.1)
