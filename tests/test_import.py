"""Importing the library changes nothing outside it: no JAX setting, no environment
variable (XLA_FLAGS and the like), no malloc setting (tests/test_host_memory.py)."""

import json
import subprocess
import sys

PROBE = """
import json, os, jax
env, config = dict(os.environ), {k: repr(v) for k, v in jax.config.values.items()}
import noprop_jax, noprop_jax.trainer, noprop_jax.cli, noprop_jax.method
noprop_jax.method.names()  # the registry loads the library's methods
after = {k: repr(v) for k, v in jax.config.values.items()}
print(json.dumps({"config": sorted(k for k in after if after[k] != config.get(k)),
                  "env": sorted(k for k in set(os.environ) | set(env) if os.environ.get(k) != env.get(k)),
                  "backends": bool(jax._src.xla_bridge._backends)}))
"""


def test_importing_the_library_changes_no_process_setting():
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.splitlines()[-1])
  assert r == {"config": [], "env": [], "backends": False}, r
