"""Keep the host memory that XLA:CPU frees after a step mapped, for the next step to reuse.

XLA:CPU allocates each execution's temporary buffers with malloc and frees them when it
ends. glibc hands out blocks that large as fresh pages: from `mmap` (above 32 MiB, or
above its adaptive threshold), or from a per-thread arena whose heap it unmaps once it is
empty. So every training step page-faults its whole working memory in again, and the
kernel zeroes each page: on a CPU, a large part of a step spent in the kernel, not in the
math. One heap for all threads, no `mmap` for large blocks and no trimming keep those pages
in the process; the next step gets them back from malloc, already mapped. The price is that
the process keeps its peak host memory until it exits (as JAX's GPU client keeps the device
memory it preallocates).

The settings are process-wide, so the library never makes them on its own: a program
calls `keep_host_memory()` (the scripts in experiments/ do, first thing), before JAX
starts its CPU backend, since they take effect only for threads that have not allocated
yet. They only apply where JAX will compute on the CPU: with a GPU or TPU the step's
memory lives on the device, and the host's malloc is best left as it is. Set
NOPROP_JAX_KEEP_HOST_MEMORY=0 to make the call do nothing.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

ENV = "NOPROP_JAX_KEEP_HOST_MEMORY"
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

# What `keep_host_memory` did: 'kept' (malloc configured before JAX's backends started),
# 'late' (configured, but after a backend started: its threads keep their own heaps),
# 'off' (the environment variable), 'accelerator' (JAX will use a GPU or TPU backend),
# 'unsupported' (not Linux with glibc), or 'not called'.
status = "not called"


def _jax_backends_started() -> bool:
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(xb, "_backends", None)) if xb is not None else False


def accelerator_expected() -> bool:
  """Whether JAX will pick a GPU or TPU backend, judged without starting one: the platforms
  JAX is told to use (JAX_PLATFORMS) do not start with cpu, or, where none are named, a
  GPU or TPU plugin is installed (it may still find no device and fall back to the CPU;
  set JAX_PLATFORMS=cpu to say so)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  return bool(plugins) or importlib.util.find_spec("libtpu") is not None


def keep_host_memory() -> str:
  """Configure glibc's malloc to keep freed memory mapped (see the module docstring) where
  JAX will compute on the CPU, and return the resulting `status`. Idempotent; does
  nothing where it cannot or should not apply."""
  global status
  if status == "kept":  # already in place before the backends started
    return status
  if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    status = "off"
    return status
  if accelerator_expected():
    status = "accelerator"
    return status
  libc = None
  if sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL("libc.so.6")
      libc.gnu_get_libc_version  # glibc only: musl's malloc has no such settings
    except (OSError, AttributeError):
      libc = None
  if libc is None:
    status = "unsupported"
    return status
  late = _jax_backends_started()
  ok = (libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # an int: its largest value
  status = ("late" if late else "kept") if ok else "unsupported"
  return status
