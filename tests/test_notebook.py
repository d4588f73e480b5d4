"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel (2 epochs per
method), its plain-Python twin examples/quickstart.py holds the same cells, and it is stored
executed (the documentation renders its outputs) from its current code."""

import re
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"
SCRIPT = EXAMPLES / "quickstart.py"
METHODS = ("NoProp-DT", "Backprop", "NoProp-FM")
EPOCHS = 2


def percent_cells(text: str) -> list[tuple[str, str]]:
  """(cell type, source) of each cell of a jupytext percent-format script: cells start at
  `# %%` lines (`# %% [markdown]`: markdown, written as `# ` comments); the header before
  the first cell is metadata."""
  cells = []
  for chunk in re.split(r"^# %%", text, flags=re.M)[1:]:
    marker, _, body = chunk.partition("\n")
    kind = "markdown" if "[markdown]" in marker else "code"
    if kind == "markdown":
      body = "\n".join(re.sub(r"^# ?", "", line) for line in body.splitlines())
    cells.append((kind, body.strip("\n")))
  return cells


def test_script_twin_holds_the_notebooks_cells():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb_cells = [(c.cell_type, c.source.strip("\n")) for c in nb.cells]
  py_cells = percent_cells(SCRIPT.read_text())
  code = lambda cells: [src for kind, src in cells if kind == "code"]
  assert code(py_cells) == code(nb_cells), (
      "examples/quickstart.py and .ipynb differ; edit one and sync the other with "
      "`jupytext --sync examples/quickstart.ipynb`, then execute it: "
      "`python experiments/execute_notebook.py`")
  assert py_cells == nb_cells  # the explanations too
  assert nb.metadata["kernelspec"]["name"] == "python3"


def test_notebook_is_stored_executed_from_its_current_code():
  sys.path.insert(0, str(ROOT / "experiments"))
  from execute_notebook import sources_hash

  nb = nbformat.read(NOTEBOOK, as_version=4)
  stamp = nb.metadata.get("noprop_jax", {})
  assert stamp.get("sources_sha256") == sources_hash(nb), (
      "examples/quickstart.ipynb's code changed since it was executed (or it never was): run "
      "python experiments/execute_notebook.py")
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom"
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the curves, the digits
  assert stamp["versions"]["jax"] and stamp["machine"]["summary"]


def test_notebook_runs_and_reports_accuracies(tmp_path, monkeypatch):
  monkeypatch.setenv("QUICKSTART_EPOCHS", str(EPOCHS))  # the kernel inherits this environment
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))  # connection files
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # The kernel is this interpreter's ipykernel (a spec whose argv starts with "python" is
  # started with sys.executable), so it imports the noprop_jax under test.
  spec = KernelSpecManager().get_kernel_spec("python3")
  assert spec.argv[0] in ("python", "python3", sys.executable), (
      f"kernel python3 would start {spec.argv[0]!r}, not this interpreter")

  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Shrunk like the documentation's examples (tests/test_readme.py): T=10 blocks -> T=3, in the
  # copy that runs only. Compiling the T=10 steps was most of this test's time.
  models = [c for c in nb.cells if c.cell_type == "code" and "T=10)" in c.source]
  assert len(models) == 2, "the DT and backprop models are built with T=10"
  for cell in models:
    cell.source = cell.source.replace("T=10)", "T=3)")
  client = NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                          resources={"metadata": {"path": str(EXAMPLES)}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

  streams = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                    for out in cell.outputs if out.output_type == "stream")
  acc = {m: float(a) for m, a in
         re.findall(r"final test accuracy (\S+): ([0-9.]+)", streams)}
  assert set(acc) == set(METHODS), streams[-2000:]
  # Each final accuracy is its method's last epoch's, as reported after its training...
  trained = dict(re.findall(rf"(\S+): {EPOCHS} epochs in \S+ s, test accuracy ([0-9.]+)", streams))
  assert {m: float(a) for m, a in trained.items()} == acc, streams[-2000:]
  # ... a fraction of the test split, to the 4 decimals printed ...
  n_test = int(re.search(r"^train \(\d+, 64\) test \((\d+), 64\)", streams, re.M).group(1))
  assert all(abs(a - round(a * n_test) / n_test) <= 5e-5 for a in acc.values()), (acc, n_test)
  # ... and NoProp-DT's is the mean path's, printed in full by the prediction cell.
  mean_path = float(re.search(r"^mean path accuracy: (\S+)$", streams, re.M).group(1))
  assert acc["NoProp-DT"] == round(mean_path, 4), (acc, mean_path)
  assert acc["NoProp-DT"] > 0.5, acc  # chance is 0.1; two epochs reach ~0.9
  images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if "image/png" in out.get("data", {})]
  assert len(images) >= 2, "the accuracy curves and the digits should be drawn"
