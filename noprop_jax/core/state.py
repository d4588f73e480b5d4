"""The training state's shared conventions: the `State` and `Metrics` types and the run's
random streams.

The key lives in the state as raw uint32 data (`new_rng`), so it checkpoints like any
other array and runs with different seeds share one compiled step; `stream` and
`step_key` fold it into independent streams and the per-step key.
"""

from typing import Any

import jax

State = dict[str, Any]
Metrics = dict[str, jax.Array]


def new_rng(key: jax.Array) -> jax.Array:
  """The run's key as raw uint32 data: a plain array that checkpoints like any other."""
  return jax.random.key_data(key)


def stream(state: State, tag: int) -> jax.Array:
  """The run's independent random stream `tag` (1: training noise, 2: batch order, 3: evaluation)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), tag)


def step_key(state: State) -> jax.Array:
  """The training step's key: every method draws its noise from it. The seed lives in the
  state, not in a static setting, so runs with different seeds share one compiled step."""
  return jax.random.fold_in(stream(state, 1), state["step"])
