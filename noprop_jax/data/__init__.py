"""Datasets: digits (embedded), MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100, Tiny ImageNet,
and the user's own arrays in one .npz file.

Sources, in order: a local directory of the original distribution files
(verified against published checksums), else TensorFlow Datasets (which has no
Tiny ImageNet: that one needs the local directory). Images come
back as uint8 [N, H, W, C] (digits: float32 in [0, 1]); the training code
scales uint8 to [0, 1] on the device. A .npz file (`load_npz`, or a path ending
in .npz given to `load`) holds x_train, y_train, x_test, y_test; its inputs keep
their shape and are uint8 or float in [0, 1] (read as float32). Nothing here runs code
from a data file: CIFAR pickles go through an unpickler that admits only numpy
arrays, and .npz files are opened with allow_pickle=False.

`load` picks the loader; the loaders live in one module per format:

  common         Split, Dataset, DataError, DATASETS and the MD5 helper they all share
  digits         scikit-learn's bundled 8x8 digits
  idx            MNIST and Fashion-MNIST from the original IDX files
  cifar          CIFAR-10/100 from the python archive or its folder (array-only unpickler)
  tiny_imagenet  Tiny ImageNet from its zip archive or folder (JPEGs decoded with PIL)
  npz            the user's arrays in one .npz file
  tfds           TensorFlow Datasets, for every named dataset but digits and Tiny ImageNet

Every public name is importable from here (`from noprop_jax import data; data.load_npz`).
"""

import os
from pathlib import Path

from . import digits, idx
from .cifar import load_cifar, safe_unpickle
from .common import DATASETS, DataError, Dataset, Split
from .digits import load_digits
from .idx import load_idx_dir, parse_idx
from .npz import load_npz
from .tfds import _expected_files, load_tfds, tfds_split
from .tiny_imagenet import _TINY, decode_rgb, load_tiny_imagenet

__all__ = ["DATASETS", "DataError", "Dataset", "Split", "decode_rgb", "load", "load_cifar",
           "load_digits", "load_idx_dir", "load_npz", "load_tfds", "load_tiny_imagenet",
           "parse_idx", "safe_unpickle", "tfds_split"]

# Private names that tests use as data.X: the same objects (patch the submodule's to
# change what its loader calls, e.g. data.digits._sklearn_digits_file).
_sklearn_digits_file, _digits_arrays = digits._sklearn_digits_file, digits._digits_arrays
_IDX_FILES, _IDX_MD5 = idx._IDX_FILES, idx._IDX_MD5


def _is_npz_path(dataset: str | os.PathLike) -> bool:
  # Named datasets are checked first by the caller, so a file called "mnist" never shadows one.
  return str(dataset).lower().endswith(".npz") or Path(dataset).is_file()


def load(dataset: str | os.PathLike, data_dir: str | os.PathLike | None = None, verify: bool = True,
         tfds_download: bool = True, tfds_dir: str | None = None) -> Dataset:
  """Load `dataset`; from `data_dir` if given, else from TensorFlow Datasets.

  `dataset` may instead be a path to a .npz file (see `load_npz`), then without `data_dir`.
  """
  if dataset not in DATASETS and _is_npz_path(dataset):
    if data_dir is not None:
      raise ValueError(f"{dataset} is a .npz file holding both splits: drop --data-dir")
    return load_npz(dataset)
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)} or give "
                     "the path of a .npz file")
  if dataset == "digits":
    if data_dir is not None:
      raise ValueError("digits is embedded (scikit-learn's bundled copy): drop --data-dir")
    return load_digits()
  if data_dir is not None:
    if not Path(data_dir).is_dir():
      raise FileNotFoundError(f"--data-dir {data_dir} is not a directory; put "
                              f"{_expected_files(dataset)} there")
    try:
      if dataset in ("mnist", "fashion_mnist"):
        return load_idx_dir(dataset, data_dir, verify)
      if dataset == "tiny_imagenet":
        return load_tiny_imagenet(data_dir, verify)
      return load_cifar(dataset, data_dir, verify)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{dataset}: {e}. Put {_expected_files(dataset)} in "
                              f"{data_dir}") from None
  if dataset == "tiny_imagenet":
    raise FileNotFoundError(f"tiny_imagenet: TensorFlow Datasets does not provide it; download "
                            f"{_TINY['url']}, put {_expected_files(dataset)} in a directory "
                            "and pass --data-dir DIR.")
  try:
    return load_tfds(dataset, tfds_dir, tfds_download)
  except DataError:  # a missing module or a bad prepared copy: its message says what to do
    raise
  except Exception as e:  # offline download failure, missing prepared data
    raise FileNotFoundError(
        f"{dataset}: no --data-dir given and TensorFlow Datasets could not provide it "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, download "
        f"{_expected_files(dataset)} elsewhere, put them in a directory and pass "
        "--data-dir DIR.") from None
