"""The README's functional-API examples run (shrunk: T=2, one or two epochs, few solver steps)."""

import re
from pathlib import Path


def test_readme_examples_run(capsys):
  text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = text.split("## The functional API\n", 1)[1].split("\n## ", 1)[0]
  dt_code, more_code = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
  assert "T=10" in dt_code and "range(15)" in dt_code
  assert "T=10" in more_code and "range(3)" in more_code and "inference_steps=100" in more_code
  scope = {}
  exec(dt_code.replace("T=10", "T=2").replace("range(15)", "range(2)"), scope)
  exec(more_code.replace("T=10", "T=2").replace("range(3)", "range(1)")
       .replace("inference_steps=100", "inference_steps=10"), scope)
  out = capsys.readouterr().out
  accuracies = dict(re.findall(r"^(.*)test accuracy: ([0-9.]+)$", out, re.M))
  assert set(accuracies) == {"", "Backprop baseline ", "NoProp-FM "}, out
  assert all(0.0 <= float(a) <= 1.0 for a in accuracies.values()), out
  assert float(accuracies[""]) > 0.2, out  # NoProp-DT, T=2, two epochs: above chance (0.1)
  loss = re.search(r"^loss on the test set: (\S+) \['ce', 'denoise', 'kl'\]$", out, re.M)
  assert loss and float(loss.group(1)) > 0, out
  assert scope["sampled"].shape == scope["logits"].shape == (len(scope["y_test"]), 10)
