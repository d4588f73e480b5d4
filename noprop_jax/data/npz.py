"""The user's own arrays in one .npz file (x_train, y_train, x_test, y_test), opened with
allow_pickle=False. Checked: the keys, input dtypes and range (uint8, or float in [0, 1]),
integer labels [N] matching the inputs, the same example shape and dtype kind in both splits."""

import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .common import DataError, Dataset, Split

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_HELP = ("np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) with integer "
             "class indices [N] as labels")


def _npz_array(f, key: str, where: str) -> np.ndarray:
  """One member, read with allow_pickle=False so an object array is refused, never unpickled."""
  try:
    arr = f[key]
  except ValueError as e:
    # numpy says "Object arrays cannot be loaded when allow_pickle=False"; other ValueErrors
    # come from garbled headers or data.
    if "allow_pickle" in str(e):
      raise DataError(f"{where}: {key} is an object array (pickled Python objects), which is "
                      "refused because loading it could run code; store a numeric array") from None
    raise DataError(f"{where}: {key} is corrupt ({e}); write the file again") from None
  except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
    raise DataError(f"{where}: {key} is corrupt or truncated ({type(e).__name__}: {e}); "
                    "write the file again") from None
  if not isinstance(arr, np.ndarray):  # a zip member that is not a .npy comes back as bytes
    raise DataError(f"{where}: {key} is not a numpy array; write it with np.savez")
  return arr


def _npz_inputs(x: np.ndarray, key: str, where: str) -> np.ndarray:
  """uint8 (0..255) or float in [0, 1], the rule the functional API enforces too.

  Other integer dtypes have no one right scale (0..255 saved as int64, or 0..65535?), and
  floats outside [0, 1] would train on another scale than the pixels the blocks expect.
  """
  if x.ndim == 0:
    raise DataError(f"{where}: {key} is a scalar; it needs a leading batch axis [N, ...]")
  if x.dtype == np.uint8:
    return x  # scaled by 1/255 on the device
  if not np.issubdtype(x.dtype, np.floating):
    raise DataError(f"{where}: {key} has dtype {x.dtype}; store uint8 pixels (0..255) or "
                    f"float in [0, 1], e.g. {key}.astype(np.uint8) for 0..255 pixels")
  x = x.astype(np.float32)
  bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise DataError(f"{where}: {key} has {bad} non-finite values (NaN, inf, or beyond float32's "
                    "range); clean or impute them before saving")
  lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
  if lo < 0 or hi > 1:
    raise DataError(f"{where}: {key} holds floats from {lo:g} to {hi:g}, outside [0, 1]; "
                    "rescale before saving, e.g. min-max scale both splits to [0, 1] with the "
                    "same min and max")
  return x


def _npz_labels(y: np.ndarray, key: str, n: int, where: str) -> np.ndarray:
  # Length and emptiness first: an empty y saved from np.array([]) is float64, and
  # "empty split" is the message that helps there.
  if y.ndim >= 1 and len(y) != n:
    raise DataError(f"{where}: x_{key[2:]} has {n} examples but {key} has {len(y)} labels; "
                    "store one label per example")
  if n == 0:
    raise DataError(f"{where}: the {key[2:]} split is empty; store at least one example")
  if y.ndim == 2 and y.shape[1] > 1:
    raise DataError(f"{where}: {key} has shape {y.shape}, which looks one-hot; store integer "
                    f"class indices [N] instead ({key}.argmax(axis=1))")
  if y.ndim != 1:
    raise DataError(f"{where}: {key} must be 1-D [N] class indices, got shape {y.shape}; store "
                    f"{key}.reshape(-1) if it holds one label per example")
  if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
    hint = " (float labels are not accepted)" if np.issubdtype(y.dtype, np.floating) else ""
    raise DataError(f"{where}: {key} has dtype {y.dtype}{hint}; store integer class indices "
                    f"0..C-1, e.g. {key}.astype(np.int64)")
  if y.min() < 0:
    raise DataError(f"{where}: {key} has {int(np.sum(y < 0))} negative labels (min {y.min()}); "
                    "class indices must be 0..C-1")
  if y.max() >= np.iinfo(np.int32).max:
    raise DataError(f"{where}: {key} has label {y.max()}, too large for a class index; "
                    "number the classes 0..C-1")
  return y.astype(np.int32)


def load_npz(path: str | os.PathLike) -> Dataset:
  """The user's arrays from one .npz file with keys x_train, y_train, x_test, y_test.

  Inputs keep their shape [N, ...] and are uint8 (0..255, scaled by 1/255 on the device)
  or float in [0, 1] (read as float32, unscaled); other integer dtypes and floats outside
  [0, 1] are refused. Labels are integer class indices [N]; num_classes is the largest
  label over both splits plus one.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file; write one with {_NPZ_HELP}")
  where = str(path)
  try:
    f = np.load(path, allow_pickle=False)
  except ValueError:
    # A pickle or garbage bytes: neither zip nor .npy magic, and with allow_pickle=False
    # numpy refuses instead of unpickling. (Its message suggests allow_pickle: not repeated.)
    raise DataError(f"{where}: corrupt or not a .npz file (neither a zip archive nor a numpy "
                    f"array); write it with {_NPZ_HELP}") from None
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(f"{where}: corrupt or not a .npz file ({type(e).__name__}: {e}); "
                    f"write it with {_NPZ_HELP}") from None
  if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy holds a single array
    raise DataError(f"{where}: corrupt or not a .npz file (a single .npy array); "
                    f"write it with {_NPZ_HELP}")
  with f:
    missing = [k for k in _NPZ_KEYS if k not in f.files]
    if missing:
      raise DataError(f"{where}: missing keys {missing} (present: {sorted(f.files)}); "
                      f"write it with {_NPZ_HELP}")
    arrays = {k: _npz_array(f, k, where) for k in _NPZ_KEYS}
  return _npz_dataset(arrays, path)


def _npz_dataset(arrays: dict[str, np.ndarray], path: Path) -> Dataset:
  where = str(path)
  xs = {s: _npz_inputs(arrays[f"x_{s}"], f"x_{s}", where) for s in ("train", "test")}
  ys = {s: _npz_labels(arrays[f"y_{s}"], f"y_{s}", len(xs[s]), where) for s in ("train", "test")}
  if xs["train"].shape[1:] != xs["test"].shape[1:]:
    raise DataError(f"{where}: x_train examples have shape {xs['train'].shape[1:]} but x_test "
                    f"examples {xs['test'].shape[1:]}; both splits need the same shape")
  if (xs["train"].dtype == np.uint8) != (xs["test"].dtype == np.uint8):
    # uint8 is scaled by 1/255 on the device and other dtypes are not: mixing them
    # would feed the test split on another scale than training.
    raise DataError(f"{where}: x_train is {arrays['x_train'].dtype} but x_test is "
                    f"{arrays['x_test'].dtype}; store both as uint8 or both as float")
  classes = np.union1d(ys["train"], ys["test"])
  if len(classes) < 2:
    raise DataError(f"{where}: the labels hold only class {classes[0]}; classification needs "
                    "at least 2 classes")
  unseen = np.setdiff1d(ys["test"], ys["train"])
  if len(unseen):
    warnings.warn(f"{where}: test classes {unseen[:10].tolist()}"
                  f"{' ...' if len(unseen) > 10 else ''} never appear in y_train; the model "
                  "cannot learn them", stacklevel=3)
  return Dataset(path.stem, Split(xs["train"], ys["train"]), Split(xs["test"], ys["test"]),
                 int(classes[-1]) + 1, where)
