"""What every method shares, each piece in one place.

Inputs and keys, calling a block of any signature (with bf16 compute), the
class embedding and linear head, the Gaussian pieces of the objectives,
inference noise, the optimizers, and how T stacked blocks are mapped on this
backend. Method modules import this package and never each other; it imports no
method module. Each concern is one module, and every name is re-exported here, so
`core.X` is the way to use any of them:

  checks    argument checks and input validation (`check_batch`, `check_predict`, ...)
  settings  `Optim` and `Compute` (the backend policy in `Compute.resolve`)
  state     the `State`/`Metrics` types, the run's PRNG streams and step keys
  protocol  the block protocol: `apply`, `features`, `from_features`, `check_block`, ...
  heads     the class embedding, the linear head, cross entropy and distances
  gaussian  q(z | y) samples, the Gaussian KL, inference noise, evaluation paths
  optim     the optimizers, the guarded update, stacked blocks' state and update
  stacking  mapping T stacked blocks (`map_blocks`, `fold_blocks`, `take`, `put`, ...)
  memory    parameter counts and XLA's peak-memory figure

A *block* is any Flax module whose `__call__` has the method's signature:
`(x, z) -> logits [B, m]` (NoProp-DT, backprop) or `(x, z, t) -> logits`
(NoProp-CT, -FM, the adjoint), with an optional `train` keyword (dropout,
BatchNorm). A block may also split itself as `features(x)` (the pathway that
ignores z and t) and `from_features(h, z[, t])` (the rest); inference then
computes `features` once per input instead of at every block or solver step.
`from_features` receives t as a scalar (every row of an ODE solve is at the
same time); `__call__` always gets t as [B].
"""

from noprop_jax.core.checks import (INFERENCE_MODES, LEVELS_MAX, PIXELS, check_batch,
                                    check_choice, check_inputs, check_positive, check_predict,
                                    to_float, value_ranges)
from noprop_jax.core.gaussian import count_correct, eval_paths, gaussian_kl, inference_noise, noisy
from noprop_jax.core.heads import (EMBEDDINGS, LEARNED_DIM, READOUT_SCALE, chain_link,
                                   cross_entropy, embedding_dim, embedding_matrix, head_logits,
                                   init_embedding, label_rows, model_dim, readout_head, sq_dist,
                                   zero_head)
from noprop_jax.core.memory import count_params, peak_bytes
from noprop_jax.core.optim import (adam_l2, adamw, all_finite, apply_if, gradient_step, jit_step,
                                   skipped, stacked_state, stacked_update, update_ok)
from noprop_jax.core.protocol import (apply, check_block, compute_dtype, features, from_features,
                                      has_split, init_block)
from noprop_jax.core.settings import FORMULATIONS, PRECISIONS, Compute, Optim
from noprop_jax.core.stacking import (chain_compute, fold_blocks, init_stacked, map_blocks,
                                      num_stacked, put, take, vmaps_blocks)
from noprop_jax.core.state import Metrics, State, new_rng, step_key, stream

__all__ = [
    # checks
    "INFERENCE_MODES", "LEVELS_MAX", "PIXELS", "check_batch", "check_choice", "check_inputs",
    "check_positive", "check_predict", "to_float", "value_ranges",
    # settings
    "FORMULATIONS", "PRECISIONS", "Compute", "Optim",
    # state
    "Metrics", "State", "new_rng", "step_key", "stream",
    # protocol
    "apply", "check_block", "compute_dtype", "features", "from_features", "has_split",
    "init_block",
    # heads
    "EMBEDDINGS", "LEARNED_DIM", "READOUT_SCALE", "chain_link", "cross_entropy",
    "embedding_dim", "embedding_matrix", "head_logits", "init_embedding", "label_rows",
    "model_dim", "readout_head", "sq_dist", "zero_head",
    # gaussian
    "count_correct", "eval_paths", "gaussian_kl", "inference_noise", "noisy",
    # optim
    "adam_l2", "adamw", "all_finite", "apply_if", "gradient_step", "jit_step", "skipped",
    "stacked_state", "stacked_update", "update_ok",
    # stacking
    "chain_compute", "fold_blocks", "init_stacked", "map_blocks", "num_stacked", "put", "take",
    "vmaps_blocks",
    # memory
    "count_params", "peak_bytes",
]
