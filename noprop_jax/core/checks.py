"""Argument checks and input validation.

The one-line ValueErrors every entry point raises for a bad setting (`check_choice`,
`check_positive`) or a bad batch (`check_batch`, `check_predict`): shapes and dtypes
always, values only where the arrays are concrete, computed on their device. Kept apart
so that settings, heads and steps can all check their arguments the same way.
"""

import jax
import jax.numpy as jnp
import numpy as np

INFERENCE_MODES = ("mean", "stochastic")


def check_choice(name: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def check_positive(name: str, value, strict: bool = True) -> None:
  if not (value > 0 if strict else value >= 0):
    raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {value}")


def to_float(x: jax.Array) -> jax.Array:
  """uint8 pixels to [0, 1]; any other input as float32, unchanged."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def check_inputs(x, input_shape: tuple[int, ...]) -> None:
  if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
    want = ", ".join(map(str, ("batch", *input_shape)))
    raise ValueError(f"inputs must have shape [{want}] (the model's input_shape "
                     f"{tuple(input_shape)}), got x of shape {tuple(x.shape)}")


PIXELS = "pass uint8 pixels 0..255 or floats in [0, 1]"
LEVELS_MAX = 16  # uint8 inputs whose maximum is 1..16 look like levels, not 0..255 pixels


def check_batch(model, x, y=None, padding: bool = False) -> None:
  """What the functional API checks of a batch x [B, *model.input_shape] (and labels y [B]),
  raising a one-line ValueError: shapes and dtypes always (they are static, so this works
  under any jit), values only where the arrays are concrete (not traced): labels in
  [0, num_classes) (`padding`: -1 too, rows that never count), float inputs finite and in
  [0, 1], uint8 inputs not 0..16 levels."""
  check_inputs(x, model.input_shape)
  if x.shape[0] == 0:
    raise ValueError(f"inputs x must hold at least one example, got an empty batch of shape "
                     f"{tuple(x.shape)}")
  if not (x.dtype == np.uint8 or jnp.issubdtype(x.dtype, jnp.floating)):
    raise ValueError(f"inputs x have dtype {x.dtype}: {PIXELS}")
  if y is not None:
    m = model.num_classes
    if y.ndim != 1:
      raise ValueError(f"labels y must be class indices of shape [batch], got shape "
                       f"{tuple(y.shape)}; for one-hot rows pass their argmax, y.argmax(-1)")
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise ValueError(f"labels y must be integer class indices in [0, {m}), got dtype "
                       f"{y.dtype}; cast whole numbers with y.astype(np.int32)")
    if y.shape[0] != x.shape[0]:
      raise ValueError(f"inputs x and labels y must have the same length, got {x.shape[0]} "
                       f"inputs and {y.shape[0]} labels")
  _check_values(model, x, y, padding)


def _check_values(model, x, y, padding: bool) -> None:
  concrete = {k: a for k, a in (("x", x), ("y", y))
              if a is not None and not isinstance(a, jax.core.Tracer)}
  found = dict(zip(concrete, value_ranges(*concrete.values())))
  if "x" in found:
    _check_pixels(x.dtype, *found["x"])
  if "y" in found:
    _check_labels(model.num_classes, padding, *found["y"])


def _check_pixels(dtype, finite: bool, lo, hi) -> None:
  if dtype == np.uint8:
    if 1 <= hi <= LEVELS_MAX:
      raise ValueError(f"inputs x are uint8 with maximum {hi}: that looks like 0..{LEVELS_MAX} "
                       "levels (e.g. sklearn's digits), not 0..255 pixels; scale them to 0..255 "
                       "or pass floats in [0, 1]")
  elif not finite:
    raise ValueError("inputs x must be finite floats in [0, 1], got NaN or inf values")
  elif lo < 0 or hi > 1:
    raise ValueError(f"inputs x must be floats in [0, 1], got values in [{float(lo):g}, "
                     f"{float(hi):g}]; {PIXELS}")


def _check_labels(m: int, padding: bool, _finite: bool, lo, hi) -> None:
  if lo < (-1 if padding else 0) or hi >= m:
    pad = " (or -1: padding)" if padding else ""
    raise ValueError(f"labels y must be class indices in [0, {m}){pad}, got values in [{lo}, {hi}]")


@jax.jit
def _device_range(a: jax.Array):
  return jnp.all(jnp.isfinite(a)), jnp.min(a), jnp.max(a)


def value_ranges(*arrays) -> list[tuple]:
  """(all finite, min, max) of each concrete array as Python scalars, computed where it
  lives: a jax array's on its device, fetching only these scalars (one host sync for all),
  any other's on the host. Works inside a trace, on arrays the trace closes over."""
  with jax.ensure_compile_time_eval():
    out = [_device_range(a) if isinstance(a, jax.Array)
           else (np.isfinite(a).all(), np.min(a), np.max(a)) for a in arrays]
  return [tuple(v.item() for v in r) for r in jax.device_get(out)]


def check_predict(model, x, mode: str, key) -> None:
  """What every method's `predict` checks before tracing: the inputs (`check_batch`), the
  mode, and a key for sampling."""
  check_batch(model, x)
  check_choice("inference mode", mode, INFERENCE_MODES)
  if mode == "stochastic" and key is None:
    raise ValueError("stochastic inference needs a PRNG key")
