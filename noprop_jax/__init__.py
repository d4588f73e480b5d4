"""NoProp in JAX: networks trained as independent denoising blocks.

One module per method (`dt`, `ct`, `fm`, their successor `diffusion_blocks`, and the
baselines `backprop`, `adjoint`, `local`), each with a `Model` (your Flax block, the input
shape, the number of classes, the method's settings), `init`, `loss`, `train_step` /
`make_train_step`, `predict`, `eval_counts` and `block_calls`.
`core` holds what they share, `blocks` the provided blocks.

Importing the package configures the host's malloc to keep the memory XLA:CPU frees after a
step for the next one (`host_memory`; NOPROP_JAX_KEEP_HOST_MEMORY=0 turns that off).
"""

from noprop_jax import host_memory

host_memory.keep_host_memory()  # first: before anything here can start JAX's backend

from noprop_jax import (adjoint, backprop, blocks, core, ct, data, diffusion_blocks, dt, fm, local,
                        schedule, solvers)
from noprop_jax.core import Compute, Optim

__all__ = ["Compute", "Optim", "adjoint", "backprop", "blocks", "core", "ct", "data",
           "diffusion_blocks", "dt", "fm", "host_memory", "local", "schedule", "solvers"]
__version__ = "0.3.0"
