"""The README's measured tables are rendered from the results files that measured them."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import render_results  # noqa: E402

FILES = sorted(render_results.RENDERERS)


def test_the_readme_tables_are_their_results_files():
  text = (ROOT / "README.md").read_text()
  assert set(FILES) <= {m[1] for m in render_results.BLOCK.findall(text)}
  assert render_results.main(["--check"]) == 0, "run python experiments/render_results.py"


@pytest.mark.parametrize("name", FILES)
def test_each_results_file_says_where_when_and_how_it_was_measured(name):
  res = json.loads((ROOT / name).read_text())
  assert res["command"].startswith("python experiments/")
  assert res["date"][:4].isdigit() and res["machine"]["summary"] and res["machine"]["cores"] >= 1
  assert {"jax", "jaxlib", "flax", "python"} <= set(res["versions"])
  assert res["settings"] and res["rows"]
  rendered = render_results.RENDERERS[name](res)
  assert res["machine"]["summary"] in rendered and res["command"] in rendered


@pytest.mark.parametrize("name", FILES)
def test_a_table_that_disagrees_with_its_file_fails_the_check(tmp_path, name, capsys):
  shutil.copy(ROOT / "README.md", tmp_path / "README.md")
  (tmp_path / "results").mkdir()
  for f in FILES:
    shutil.copy(ROOT / f, tmp_path / f)
  assert render_results.main(["--check", "--page", str(tmp_path / "README.md")]) == 0
  res = json.loads((tmp_path / name).read_text())
  row = next(r for r in res["rows"] if "s_median" in r or "peak" in r)
  key = "s_median" if "s_median" in row else "peak"
  row[key] *= 1.5  # a re-measurement the README was not rendered from
  (tmp_path / name).write_text(json.dumps(res))
  assert render_results.main(["--check", "--page", str(tmp_path / "README.md")]) == 1
  assert "differs from its results file" in capsys.readouterr().err
  # rendering brings them back together
  assert render_results.main(["--page", str(tmp_path / "README.md")]) == 0
  assert render_results.main(["--check", "--page", str(tmp_path / "README.md")]) == 0
