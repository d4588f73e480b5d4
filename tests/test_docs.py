"""The documentation: the site builds strictly and offline, its API reference holds every
public function and class, the executed notebook and the math render, and the README stays
short with the commands CI runs."""

import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import noprop_jax

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
  """`mkdocs build --strict` into a temporary folder (broken links, anchors or references
  and missing pages fail it)."""
  out = tmp_path_factory.mktemp("site")
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  shutil.rmtree(ROOT / ".cache", ignore_errors=True)  # mkdocs-jupyter's conversion cache
  return out


def inventory(site: Path) -> set[str]:
  """The names the built site documents (its Sphinx-style objects.inv)."""
  header, _, body = (site / "objects.inv").read_bytes().partition(b"zlib.\n")
  assert header.startswith(b"# Sphinx inventory version 2")
  return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def public_objects() -> list[str]:
  """Every public function and class defined in a module of the package."""
  names = []
  modules = [noprop_jax] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(
      noprop_jax.__path__, "noprop_jax.")]
  for module in modules:
    for name, obj in vars(module).items():
      if (not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
          and obj.__module__ == module.__name__):
        names.append(f"{module.__name__}.{name}")
  return names


def test_every_public_function_and_class_is_in_the_api_reference(site):
  documented = inventory(site)
  objects = public_objects()
  assert len(objects) > 150 and "noprop_jax.dt.loss" in objects  # the walk found the package
  missing = [n for n in objects if n not in documented]
  assert not missing, f"not in the API reference (docs/api/*.md): {missing}"


def test_the_notebook_page_shows_its_outputs(site):
  html = (site / "quickstart" / "index.html").read_text()
  assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) >= 2  # curves, digits
  assert "final test accuracy NoProp-DT" in html


def test_the_math_is_marked_up_for_mathjax(site):
  html = (site / "methods" / "dt" / "index.html").read_text()
  assert html.count('class="arithmatex"') >= 3
  assert r"\mathrm{SNR}" in html
  assert "javascripts/mathjax.js" in html and "tex-mml-chtml.js" in html


def test_every_method_has_its_page_with_equation_and_settings(site):
  from noprop_jax import method as methods
  pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
  for name in ("dt", "ct", "fm", "backprop", "adjoint", "diffusion_blocks", "local"):
    page = name.replace("_", "-")
    assert page in pages, name
    text = (ROOT / "docs" / "methods" / f"{page}.md").read_text()
    assert "\\[" in text, f"{page}.md: no displayed equation"
    assert f"<!-- settings {name} -->" in text, f"{page}.md: no settings table"
    assert methods.get(name).title.split()[0].lower() in text.lower()


def test_readme_is_short_and_its_commands_are_the_ones_ci_runs():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 200
  commands = re.findall(r"^    (python .*)$", readme, re.M)
  install, main_job, tests = (next(c for c in commands if key in c) for key in
                              ("pip install -e '.[test]'", "experiments/train.py", "pytest"))
  assert main_job == "python experiments/train.py"
  ci = (ROOT / ".ci" / "run").read_text()
  assert install in ci and tests in ci, "the README's install and test commands are CI's"
  for link in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", readme):
    assert (ROOT / link).exists(), f"README links {link}, which does not exist"
