"""MNIST, Fashion-MNIST and CIFAR-10/100 from TensorFlow Datasets (the `tfds` extra),
downloaded and prepared on first use. Checked: uint8 images [N, H, W, C] and labels in the
dataset's class range; a missing module says what to install or which files --data-dir needs."""

import numpy as np

from .cifar import _CIFAR
from .common import DataError, Dataset, Split
from .idx import _IDX_FILES
from .tiny_imagenet import _TINY


def _expected_files(dataset: str) -> str:
  if dataset in ("mnist", "fashion_mnist"):
    return ", ".join(f"{b}.gz" for b in _IDX_FILES.values()) + " (gzipped or not)"
  spec = _TINY if dataset == "tiny_imagenet" else _CIFAR[dataset]
  return f"{spec['archive']} or its extracted folder {spec['folder']}/"


_TFDS_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
_TFDS_INSTALL = "pip install -e '.[tfds]'"
_TFDS_BATCH = 10_000


def _tfds_missing(dataset: str, e: ImportError) -> DataError:
  module = e.name or str(e)
  return DataError(f"{dataset}: TensorFlow Datasets needs the module {module!r}, which is not "
                   f"installed; run {_TFDS_INSTALL} in the project's root, or pass --data-dir DIR "
                   f"holding the original files: {_expected_files(dataset)}")


def tfds_split(dataset: str, batches, split: str) -> Split:
  """(images, labels) numpy batches of one TFDS split (as_supervised) -> a Split.

  Images must be uint8 [N, H, W, C] and labels class indices of `dataset`, so a TFDS
  copy of another version or dataset stops here rather than training on it.
  """
  pairs = [(np.asarray(x), np.asarray(y).reshape(-1)) for x, y in batches]
  where = f"tensorflow_datasets {dataset}/{split}"
  if sum(len(y) for _, y in pairs) == 0:
    raise DataError(f"{where}: the split is empty; delete its prepared copy and run again, "
                    "or pass --data-dir DIR")
  images = np.concatenate([x for x, _ in pairs])
  labels = np.concatenate([y for _, y in pairs])
  classes = _TFDS_CLASSES[dataset]
  if images.dtype != np.uint8 or images.ndim != 4:
    raise DataError(f"{where}: expected uint8 images [N, H, W, C], got {images.dtype} "
                    f"{images.shape}; delete its prepared copy and run again, or pass --data-dir")
  if len(labels) != len(images) or labels.min() < 0 or labels.max() >= classes:
    raise DataError(f"{where}: expected {len(images)} labels in 0..{classes - 1}, got "
                    f"{len(labels)} in {labels.min()}..{labels.max()}; delete its prepared copy "
                    "and run again, or pass --data-dir")
  return Split(images, labels.astype(np.int32))


def load_tfds(dataset: str, data_dir: str | None = None, download: bool = True) -> Dataset:
  """`dataset` from TensorFlow Datasets, downloaded and prepared on first use.

  Preparing and reading need TensorFlow and importlib_resources (the project's `tfds`
  extra), which TFDS itself does not install; a missing module is a DataError that says
  what to install.
  """
  try:
    import tensorflow_datasets as tfds

    # Fixed batches, not batch_size=-1: that asks for one batch of the split's recorded size,
    # which is sys.maxsize (TensorFlow aborts) when the metadata lacks it (tfds.testing.mock_data).
    train, test = tfds.load(dataset, split=["train", "test"], batch_size=_TFDS_BATCH,
                            as_supervised=True, data_dir=data_dir, download=download)
    splits = {"train": tfds.as_numpy(train), "test": tfds.as_numpy(test)}
    splits = {name: tfds_split(dataset, batches, name) for name, batches in splits.items()}
  except ImportError as e:  # at import, or lazily inside tfds (TensorFlow, importlib_resources)
    raise _tfds_missing(dataset, e) from None
  return Dataset(dataset, splits["train"], splits["test"], _TFDS_CLASSES[dataset],
                 "tensorflow_datasets")
