"""The digits dataset: scikit-learn's bundled 8x8 digits (digits.csv.gz), read from
scikit-learn's installed files without importing it where possible, else through
`sklearn.datasets.load_digits`; a fixed stratified train/test split. No download, no checksum."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from .common import Dataset, Split


def _sklearn_digits_file() -> Path | None:
  """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn."""
  spec = importlib.util.find_spec("sklearn")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = Path(root, "datasets", "data", "digits.csv.gz")
    if path.is_file():
      return path
  return None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8] of 0..16, labels): scikit-learn's `load_digits()`, read from its
  file directly where it is found (importing scikit-learn takes about a second, a test
  process's or a short run's largest fixed cost after JAX's)."""
  path = _sklearn_digits_file()
  if path is None:
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    return d.images, d.target
  with gzip.open(path, "rt") as f:
    rows = np.loadtxt(f, delimiter=",")  # 64 pixels, then the label: as scikit-learn reads it
  return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits, a fixed stratified split (seed 0, 20% test per class)."""
  images, labels = _digits_arrays()
  images = (images.astype(np.float32) / 16.0)[..., None]
  labels = labels.astype(np.int32)
  rng = np.random.RandomState(split_seed)
  test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test[idx[: int(round(test_fraction * len(idx)))]] = True
  return Dataset("digits", Split(images[~test], labels[~test]), Split(images[test], labels[test]),
                 10, "scikit-learn bundled digits")
