"""The measured tables of the README and the documentation are rendered from the results
files that measured them, and the command line's tables from the settings."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import render_results  # noqa: E402

FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "results").glob("*.json"))


def _blocks() -> set[str]:
  return {m[1] for page in render_results.pages() for m in render_results.BLOCK.findall(page.read_text())}


def test_every_generated_block_is_current():
  assert set(FILES) <= _blocks(), "every results file is shown on some page"
  assert render_results.main(["--check"]) == 0, "run python experiments/render_results.py"


def test_every_block_names_a_results_file_that_exists():
  for name in _blocks():
    assert (ROOT / name).is_file(), name


@pytest.mark.parametrize("name", FILES)
def test_each_results_file_says_where_when_and_how_it_was_measured(name):
  res = json.loads((ROOT / name).read_text())
  assert res["command"].startswith("python experiments/")
  assert res["date"][:4].isdigit() and res["machine"]["summary"] and res["machine"]["cores"] >= 1
  assert {"jax", "jaxlib", "flax", "python"} <= set(res["versions"])
  assert res["settings"] and res["rows"]
  rendered = render_results.renderer(res, name)(res)
  assert res["machine"]["summary"] in rendered and res["command"] in rendered


def _scaled(x):
  """Every float in a results file's rows, 1.5 times as large: a re-measurement."""
  if isinstance(x, float):
    return x * 1.5
  if isinstance(x, dict):
    return {k: _scaled(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_scaled(v) for v in x]
  return x


@pytest.mark.parametrize("name", FILES)
def test_a_table_that_disagrees_with_its_file_fails_the_check(tmp_path, name, capsys):
  pages = [p for p in render_results.pages() if f"<!-- {name}" in p.read_text()]
  copies = []
  for page in pages:
    copy = tmp_path / page.relative_to(ROOT)
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(page, copy)
    copies.append(copy)
  shutil.copytree(ROOT / "results", tmp_path / "results")
  args = [a for c in copies for a in ("--page", str(c))]
  assert render_results.main(["--check", *args]) == 0
  res = json.loads((tmp_path / name).read_text())
  res["rows"] = _scaled(res["rows"])  # a re-measurement the pages were not rendered from
  (tmp_path / name).write_text(json.dumps(res))
  assert render_results.main(["--check", *args]) == 1
  assert "differs from its source" in capsys.readouterr().err
  # rendering brings them back together
  assert render_results.main(args) == 0
  assert render_results.main(["--check", *args]) == 0


def test_a_results_file_of_an_unknown_script_is_named_with_the_known_ones(tmp_path):
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "x.json").write_text(json.dumps({"command": "python experiments/mine.py"}))
  page = tmp_path / "page.md"
  page.write_text("<!-- results/x.json -->\n<!-- end results -->\n")
  with pytest.raises(SystemExit, match=r"results/x.json: no renderer for results written by "
                     r"'python experiments/mine.py'; known scripts: \['accelerator_benchmark.py'"):
    render_results.main(["--page", str(page)])


def test_a_settings_table_that_disagrees_with_the_settings_fails_the_check(tmp_path):
  page = tmp_path / "dt.md"
  text = (ROOT / "docs" / "methods" / "dt.md").read_text()
  page.write_text(text.replace("| `--eta` |", "| `--eta-typo` |"))
  (tmp_path / "results").mkdir()
  assert render_results.main(["--check", "--page", str(page)]) == 1
  assert render_results.main(["--page", str(page)]) == 0
  assert page.read_text() == text
