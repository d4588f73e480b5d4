"""Sizes: a tree's parameter count and a compiled program's peak memory (XLA's memory
analysis), for the trainer's logs and the benchmarks.
"""

from typing import Any

import jax

def count_params(tree: Any) -> int:
  """Parameters in a tree (works on `jax.eval_shape` output too)."""
  return int(sum(a.size for a in jax.tree.leaves(tree)))


def peak_bytes(compiled) -> int | None:
  """What a compiled program needs at once: arguments + outputs - aliased + temporaries
  (XLA's memory analysis), or None where the backend gives none."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
