"""The block protocol: calling a block of any signature.

A block is a Flax module called as `(x, z)` or `(x, z, t)` with an optional `train`
keyword, and may split itself as `features(x)` / `from_features(h, z[, t])` (see the
package docstring). `apply` is the one place a block runs: it passes `train` where taken,
updates BatchNorm collections in training and casts to bfloat16 compute; `check_block`
gives a clear error for a block of the wrong signature.
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

def _takes_train(block: nn.Module, method: str) -> bool:
  return "train" in inspect.signature(getattr(type(block), method)).parameters


def has_split(block: nn.Module) -> bool:
  """Whether the block computes its z- and t-independent pathway separately."""
  return callable(getattr(block, "features", None)) and callable(getattr(block, "from_features", None))


def check_block(block: nn.Module | None, time_conditioned: bool, method: str) -> None:
  """A clear error where `block`'s `__call__` cannot take the method's inputs: (x, z) or,
  `time_conditioned`, (x, z, t), plus an optional `train` keyword. None passes (a config
  validated before the data fixes the block)."""
  if block is None:
    return
  want = 3 if time_conditioned else 2
  params = [p for p in list(inspect.signature(type(block).__call__).parameters.values())[1:]
            if p.name != "train" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = sum(p.default is p.empty for p in params)
  if not required <= want <= len(params):
    sig = "(x, z, t)" if time_conditioned else "(x, z)"
    kind = ("a time-conditioned block, e.g. blocks.CTBlock, MLPTimeBlock or ViTTimeBlock"
            if time_conditioned else "a block without t, e.g. blocks.DTBlock, MLPBlock or ViTBlock")
    raise ValueError(f"{method} calls its block as block{sig}, but {type(block).__name__}.__call__ "
                     f"takes ({', '.join(p.name for p in params)}): use {kind}")


def init_block(block: nn.Module, key: jax.Array, *inputs) -> dict:
  """The block's variables ({'params', ...}) for example inputs."""
  kw = {"train": False} if _takes_train(block, "__call__") else {}
  return dict(block.init({"params": key}, *inputs, **kw))


def compute_dtype(precision: str):
  return jnp.bfloat16 if precision == "bfloat16" else jnp.float32


def apply(block: nn.Module, variables: dict, *inputs, train: bool = False,
          rng: jax.Array | None = None, method: str = "__call__",
          precision: str = "float32") -> tuple[jax.Array, dict]:
  """`block.apply` for any block: passes `train` where the method takes it, updates the
  non-parameter collections (BatchNorm statistics) in training, and computes at
  `precision`: with bfloat16 the float32 parameters and the first two inputs (x or its
  features, and z) are cast inside, so gradients return float32 to the parameters and
  the optimizer state stays float32. A third input, the time or noise level t, stays
  float32: a time embedding multiplies t by ~1000 before its sines, where bfloat16's
  rounding of t (up to 2^-9 near 1) would be radians of phase. The block casts its
  embedding of t, whose values are in [-1, 1], to the compute dtype itself.
  Returns (float32 output, updated collections: {} outside training or without any)."""
  dtype = compute_dtype(precision)
  cast = lambda t: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
  if dtype != jnp.float32:
    variables = {**variables, "params": cast(variables["params"])}
    inputs = (*cast(inputs[:2]), *inputs[2:])
  mutable = ([c for c in variables if c != "params"] if train else []) or False
  kw = {"train": train} if _takes_train(block, method) else {}
  out = block.apply(variables, *inputs, method=None if method == "__call__" else method,
                    rngs={"dropout": rng} if rng is not None else None, mutable=mutable, **kw)
  out, updates = out if mutable else (out, {})
  return out.astype(jnp.float32), dict(updates)


def features(block: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
  """The block's z-independent pathway on x, or x itself for a block without the split."""
  return apply(block, variables, x, method="features")[0] if has_split(block) else x


def from_features(block: nn.Module, variables: dict, h: jax.Array, z: jax.Array,
                  *t: jax.Array) -> jax.Array:
  """The block's output given `features` (inference mode). An optional scalar t is
  passed as it is to `from_features`, and as [B] to a block's `__call__`."""
  if has_split(block):
    return apply(block, variables, h, z, *t, method="from_features")[0]
  return apply(block, variables, h, z, *(jnp.full((z.shape[0],), s) for s in t))[0]
