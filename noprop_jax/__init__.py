"""NoProp in JAX: networks trained as independent denoising blocks.

One module per method (`dt`, `ct`, `fm`, their successor `diffusion_blocks`, and the
baselines `backprop`, `adjoint`, `local`), each with a `Model` (your Flax block, the input
shape, the number of classes, the method's settings), `init`, `loss`, `train_step` /
`make_train_step`, `predict`, `eval_counts` and `block_calls`.
`core` holds what they share, `blocks` the provided blocks.

Importing the package changes nothing outside it. On a CPU, a program that trains calls
`noprop_jax.host_memory.keep_host_memory()` first, before JAX computes anything: it makes
glibc's malloc keep the memory XLA:CPU frees after a step for the next one (the scripts in
experiments/ do).
"""

from noprop_jax import (adjoint, backprop, blocks, core, ct, data, diffusion_blocks, dt, fm,
                        host_memory, local, schedule, solvers)
from noprop_jax.core import Compute, Optim

__all__ = ["Compute", "Optim", "adjoint", "backprop", "blocks", "core", "ct", "data",
           "diffusion_blocks", "dt", "fm", "host_memory", "local", "schedule", "solvers"]
__version__ = "0.3.0"
