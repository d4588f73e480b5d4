"""Execute examples/quickstart.ipynb in place, so that it is stored with its outputs (the
accuracy curves, the predictions) and the documentation renders them.

  python experiments/execute_notebook.py

It runs every cell in a fresh python3 kernel (this interpreter's ipykernel), from the
notebook's folder, and stamps the notebook's metadata with a hash of its code cells, the
date, the machine and the library versions. tests/test_notebook.py recomputes the hash:
a notebook whose code changed since it was executed fails until this is rerun.
"""

import argparse
import datetime
import hashlib
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import results  # experiments/ (the script's folder) is on sys.path

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def sources_hash(nb) -> str:
  """The hash of the notebook's code cells, in order: what its outputs were computed from."""
  code = "\n# --- cell ---\n".join(c.source for c in nb.cells if c.cell_type == "code")
  return hashlib.sha256(code.encode()).hexdigest()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--notebook", type=Path, default=NOTEBOOK)
  p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  args = p.parse_args(argv)
  nb = nbformat.read(args.notebook, as_version=4)
  os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  NotebookClient(nb, kernel_name="python3", timeout=args.timeout, allow_errors=False,
                 resources={"metadata": {"path": str(args.notebook.parent)}}).execute()
  import jax
  device = jax.devices()[0]
  nb.metadata["noprop_jax"] = {
      "sources_sha256": sources_hash(nb),
      "executed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": "python experiments/execute_notebook.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
      "machine": results.machine(device.platform, device.device_kind),
      "versions": results.versions()}
  nbformat.write(nb, args.notebook)
  print(f"executed {args.notebook}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
