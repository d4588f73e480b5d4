"""NoProp in JAX: networks trained as independent denoising blocks.

One module per method (`dt`, `ct`, `fm`, and the baselines `backprop`, `adjoint`), each
with a `Model` (your Flax block, the input shape, the number of classes, the method's
settings), `init`, `loss`, `train_step` / `make_train_step`, `predict` and `eval_counts`.
`core` holds what they share, `blocks` the provided blocks.
"""

from noprop_jax import adjoint, backprop, blocks, core, ct, data, dt, fm, schedule, solvers
from noprop_jax.core import Compute, Optim

__all__ = ["Compute", "Optim", "adjoint", "backprop", "blocks", "core", "ct", "data", "dt", "fm",
           "schedule", "solvers"]
__version__ = "0.3.0"
