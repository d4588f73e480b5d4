"""`host_memory.keep_host_memory()` keeps the host memory XLA:CPU frees between calls mapped
(glibc); importing the library changes nothing."""

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
if sys.argv[1] != "import-only":
  noprop_jax.host_memory.keep_host_memory()
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
  env = {"JAX_PLATFORMS": "cpu", **env}
  out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300)
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


@pytest.mark.skipif(host_memory.status == "unsupported", reason="not Linux with glibc")
def test_importing_the_library_leaves_malloc_alone():
  r = _probe("import-only", **{host_memory.ENV: "1"})
  assert r["status"] == "not called"
  # glibc's defaults: every call faults its 64 MiB temporary in again.
  assert r["faults"] > 0.5 * r["temp"] / 4096, r


# The status is read without JAX starting a backend: a platform that is not here is fine.
STATUS = ("import os, sys; from noprop_jax import host_memory; "
          "print(host_memory.keep_host_memory(), 'jax._src.xla_bridge' in sys.modules and "
          "bool(sys.modules['jax._src.xla_bridge']._backends))")


@pytest.mark.parametrize("platforms, want", [("cuda", "accelerator"), ("tpu,cpu", "accelerator"),
                                             ("cpu", "kept")])
def test_malloc_is_configured_only_where_jax_computes_on_the_cpu(platforms, want):
  if want == "kept" and host_memory.status == "unsupported":
    want = "unsupported"
  out = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": platforms, host_memory.ENV: "1"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == [want, "False"]  # and no backend was started to find out


def test_an_installed_accelerator_plugin_counts_where_no_platform_is_named(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  plugin = host_memory.importlib.metadata.EntryPoint("cuda", "jax_cuda12_plugin", "jax_plugins")
  monkeypatch.setattr(host_memory.importlib.metadata, "entry_points",
                      lambda group: [plugin] if group == "jax_plugins" else [])
  assert host_memory.accelerator_expected()
  monkeypatch.setattr(host_memory.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
  assert not host_memory.accelerator_expected()
