"""NoProp in JAX: networks trained as independent denoising blocks.

One module per method (`dt`, `ct`, `fm`, their successor `diffusion_blocks`, and the
baselines `backprop`, `adjoint`, `local`), each with a `Model` (your Flax block, the input
shape, the number of classes, the method's settings), `init`, `loss`, `train_step` /
`make_train_step`, `predict`, `eval_counts` and `block_calls`.
Each module's record `METHOD` (`noprop_jax.method.Method`) says what the trainer and the
scripts need to know about it; `noprop_jax.method` is the one registry of methods, where
a method of one's own is registered. `core` holds what the methods share, `blocks` the
provided blocks.

Names. An array's name may end in its shape: after the last underscore, upper-case letters
name its axes in order: B batch (N in the convolutions, as XLA names it), T blocks (or
solver steps), D the label embedding's dimension, M classes, H, W, C an image's (or a
kernel's) height, width and channels, I, O a kernel's input and output channels, P a
patch's features, L tokens, F a layer's features, K a chunk of blocks, R rows. `eps_TBD`
is [T, B, D] (`feats_TB` is [T, B, ...], its trailing axes unnamed). A time index is
glued to the name instead, never written after an underscore: `z0_BD`, `zT_BD`, `z1_BD`
are z at times 0, T and 1, each [B, D]; `z_T` would read as z over the blocks. Docstrings
write the paper's math the same way (zT, z0); a lower-case or braced subscript there
(u_hat_t, z_{t-1}) is an index, since no axis letter is lower-case.

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
