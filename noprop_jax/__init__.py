"""NoProp in JAX: networks trained as independent denoising blocks.

One module per method (`dt`, `ct`, `fm`, their successor `diffusion_blocks`, and the
baselines `backprop`, `adjoint`, `local`), each with a `Model` (your Flax block, the input
shape, the number of classes, the method's settings), `init`, `loss`, `train_step` /
`make_train_step`, `predict`, `eval_counts` and `block_calls`.
Each module's record `METHOD` (`noprop_jax.method.Method`) says what the trainer and the
scripts need to know about it; `noprop_jax.method` is the one registry of methods, where
a method of one's own is registered. `core` holds what the methods share, `blocks` the
provided blocks.

Importing the package changes nothing outside it. On a CPU, a program that trains calls
`noprop_jax.host_memory.keep_host_memory()` first, before JAX computes anything: it makes
glibc's malloc keep the memory XLA:CPU frees after a step for the next one (the scripts in
experiments/ do).
"""

from noprop_jax import (adjoint, backprop, blocks, core, ct, data, diffusion_blocks, dt, fm,
                        host_memory, local, method, schedule, solvers)
from noprop_jax.core import Compute, Optim

__all__ = ["Compute", "Optim", "adjoint", "backprop", "blocks", "core", "ct", "data",
           "diffusion_blocks", "dt", "fm", "host_memory", "local", "method", "schedule", "solvers"]
__version__ = "0.4.0"
