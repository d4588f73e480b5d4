"""What every loader shares: the dataset names `load` knows, the Split/Dataset types
the loaders return, DataError for a bad file, and the MD5 helper the checksums use."""

import dataclasses
import hashlib

import numpy as np

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")


class DataError(ValueError):
  """A data file is corrupt, truncated, of the wrong format or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # [N, H, W, C], uint8 (or float32 in [0, 1])
  labels: np.ndarray  # [N], int32

  def __post_init__(self):
    if len(self.images) != len(self.labels):
      raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  test: Split
  num_classes: int
  source: str  # where it was read from, for the logs


def _md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()
