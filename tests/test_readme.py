"""The README's functional-API example runs (shrunk to T=2 and one epoch)."""

import re
from pathlib import Path


def test_readme_example_runs(capsys):
  text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
  assert "T=10" in code and "range(15)" in code
  exec(code.replace("T=10", "T=2").replace("range(15)", "range(1)"), {})
  out = capsys.readouterr().out
  assert "test accuracy:" in out and "loss on a batch:" in out
