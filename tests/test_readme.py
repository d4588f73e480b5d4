"""The README's functional-API examples run (shrunk: T=2, one epoch, few solver steps)."""

import re
from pathlib import Path


def test_readme_examples_run(capsys):
  text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  dt_code, ct_code = re.findall(r"```python\n(.*?)```", text, re.S)[:2]
  assert "T=10" in dt_code and "range(15)" in dt_code
  assert "range(3)" in ct_code and "inference_steps=100" in ct_code
  scope = {}
  exec(dt_code.replace("T=10", "T=2").replace("range(15)", "range(1)"), scope)
  exec(ct_code.replace("range(3)", "range(1)").replace("inference_steps=100", "inference_steps=10"),
       scope)
  out = capsys.readouterr().out
  assert "test accuracy:" in out and "loss on a batch:" in out and "FM test accuracy:" in out
