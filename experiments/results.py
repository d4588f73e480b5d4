"""Results files: what a benchmark measured, with where, when and how it was measured.

Every measured figure the README and the documentation show comes from one of these JSON
files, written by the command that measured it (`write`) and rendered into the pages by
`render_results.py`.
"""

import datetime
import json
import os
import platform
import sys
from pathlib import Path


def cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions() -> dict:
  """The versions of the libraries a measurement depends on (torch where importable)."""
  import flax
  import jax
  import jaxlib
  import numpy
  import optax
  out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__}
  try:
    import torch
    out["torch"] = torch.__version__
  except ImportError:
    pass
  return out


def machine(backend: str, device_kind: str) -> dict:
  """The machine: the accelerator's name, or the CPU's model and cores."""
  cores = len(os.sched_getaffinity(0))
  summary = device_kind if backend != "cpu" else f"{cpu_model()}, {cores} cores"
  return {"backend": backend, "device": device_kind, "cpu": cpu_model(), "cores": cores,
          "summary": summary}


def write(path: Path, script: str, argv: list[str] | None, rows: list[dict], settings: dict,
          backend: str | None = None, device_kind: str | None = None, **extra) -> None:
  """The results file: the command, the date (UTC), machine, versions, settings, rows. The
  machine is JAX's first device unless `backend` and `device_kind` name another (a
  benchmark that measured in a process of its own)."""
  if backend is None or device_kind is None:
    import jax
    device = jax.devices()[0]
    backend, device_kind = backend or device.platform, device_kind or device.device_kind
  argv = sys.argv[1:] if argv is None else argv
  result = {"command": " ".join(["python", f"experiments/{Path(script).name}", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(backend, device_kind), "versions": versions(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
            **extra, "rows": rows}
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
