"""The settings a method is given: `Optim` (the optimizer's) and `Compute` (how a step
executes, with the backend policy for 'auto' in `Compute.resolve`).

Frozen dataclasses that check themselves on construction (with `checks`, their only
dependency in the core); the optimizers and the stacked-block mapping read them.
"""

import dataclasses
import math

import jax

from noprop_jax.core.checks import check_choice

FORMULATIONS = ("auto", "vmap", "unroll", "scan")
PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Optim:
  """Optimizer settings (paper Table 4). Each method builds its optimizer from them."""

  lr: float = 1e-3  # learning rate
  weight_decay: float = 1e-3  # AdamW's decoupled decay (DT, baselines) or Adam's L2 (CT, FM)
  grad_clip: float = 1.0  # clip by the gradient norm of each block / parameter group; 0: off

  def __post_init__(self):
    # inf passes a plain `> 0` check, and any non-finite setting makes every update non-finite.
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"learning rate must be > 0 and finite, got lr={self.lr}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"weight_decay must be >= 0 and finite, got weight_decay={self.weight_decay}")
    if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
      raise ValueError("grad_clip must be >= 0 and finite (0 disables clipping), got "
                       f"grad_clip={self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class Compute:
  """How a step executes; the results are the same up to float reordering."""

  formulation: str = "auto"  # stacked blocks: vmap | unroll | scan; auto: by backend
  blocks_per_step: int = 0  # blocks computed at once (a divisor of T); 0: all T
  precision: str = "float32"  # compute dtype; bfloat16 keeps float32 parameters

  def __post_init__(self):
    check_choice("formulation", self.formulation, FORMULATIONS)
    check_choice("precision", self.precision, PRECISIONS)
    if self.blocks_per_step < 0:
      raise ValueError(f"blocks_per_step must be >= 0 (0: all T), got {self.blocks_per_step}")
    if self.formulation == "scan" and self.blocks_per_step not in (0, 1):
      raise ValueError("formulation scan is one block at a time (blocks_per_step 1), got "
                       f"{self.blocks_per_step}")

  def resolve(self, T: int, mesh_blocks: int = 1, auto: str | None = None,
              backend: str | None = None) -> "Compute":
    """Concrete settings for T blocks on `backend` (default: JAX's default backend; call
    outside traced code).

    'auto' is `auto` where a method gives one (its record's `auto_formulation`), else 'unroll' on
    XLA:CPU, where batched (vmapped) convolutions and conv weight gradients in loops are
    slow, and 'vmap' on GPU/TPU or when the blocks are split over a mesh."""
    form = self.formulation if self.formulation != "auto" or auto is None else auto
    if form == "auto":
      cpu = (backend or jax.default_backend()) == "cpu"
      form = "unroll" if cpu and mesh_blocks == 1 else "vmap"
    k = 1 if form == "scan" else (self.blocks_per_step or T)
    if T % k:
      raise ValueError(f"blocks_per_step must divide T={T} (or be 0: all T), got {k}")
    return dataclasses.replace(self, formulation=form, blocks_per_step=k)
