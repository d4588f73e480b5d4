"""`import noprop_jax` keeps the host memory XLA:CPU frees between calls mapped (glibc)."""

import json
import os
import subprocess
import sys

import pytest

from noprop_jax import host_memory

# A program with a 64 MiB temporary (sin(x), consumed by a product), called 30 times;
# prints the status, the temporary's size and the median page faults of a call (XLA frees
# some buffers late, so a call now and then still grows the heap while it settles).
PROBE = """
import json, resource, sys
if sys.argv[1] == "late":
  import jax.numpy as jnp; jnp.ones(1).block_until_ready()  # a backend before the import
import noprop_jax
import jax, jax.numpy as jnp
x, w = jnp.ones((8192, 2048)), jnp.ones((2048, 4))
f = jax.jit(lambda x, w: jnp.sin(x) @ w).lower(x, w).compile()
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"status": noprop_jax.host_memory.status, "faults": sorted(faults)[15],
                  "temp": f.memory_analysis().temp_size_in_bytes}))
"""


def _probe(mode: str, **env) -> dict:
  out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       env={**os.environ, **env, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.status == "unsupported", reason="not Linux with glibc")
def test_the_freed_temporaries_stay_mapped_for_the_next_call():
  r = _probe("fresh", **{host_memory.ENV: "1"})
  assert r["status"] == "kept"
  assert r["temp"] >= 64 * 2**20
  # Without the settings every call faults its 64 MiB temporary in again (16k pages here);
  # with them, most calls fault none.
  assert r["faults"] < 0.1 * r["temp"] / 4096, r


def test_the_environment_variable_leaves_malloc_alone_and_a_late_import_says_so():
  assert _probe("fresh", **{host_memory.ENV: "0"})["status"] == "off"
  if host_memory.status != "unsupported":
    assert _probe("late", **{host_memory.ENV: "1"})["status"] == "late"
