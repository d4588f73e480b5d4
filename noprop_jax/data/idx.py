"""MNIST and Fashion-MNIST from the four original IDX files (gzipped or not) in a
directory the user downloaded. Each file is checked against the published MD5s (of the
.gz or of its uncompressed content), and its IDX header against its length and shape."""

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .common import DataError, Dataset, Split, _md5

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5s of the original .gz downloads and of their uncompressed content (a re-compressed
# or gunzipped file has other bytes but the same content). Fashion-MNIST's content MD5s:
# the labels' computed here from the official repository's .gz files (whose own MD5s
# match the published ones); the images', whose .gz the snapshot lacked, as published by
# two independent sources that agree with ours on the labels.
_IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
}



def parse_idx(data: bytes, what: str) -> np.ndarray:
  """An IDX file of unsigned bytes (magic 0x0000 08 nd) -> uint8 array."""
  if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
    raise DataError(f"{what}: not an IDX file of unsigned bytes (bad magic number {data[:4]!r})")
  nd = data[3]
  header = 4 + 4 * nd
  if nd not in (1, 3) or len(data) < header:
    raise DataError(f"{what}: IDX header with {nd} dimensions is truncated or unsupported")
  dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd))
  expected = header + int(np.prod(dims))
  if len(data) != expected:
    kind = "truncated" if len(data) < expected else "longer than its header says"
    raise DataError(f"{what}: file is {kind}: {len(data)} bytes, header {dims} needs {expected}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_idx(directory: Path, base: str, dataset: str, verify: bool) -> np.ndarray:
  for name in (base + ".gz", base):
    path = directory / name
    if path.exists():
      break
  else:
    raise FileNotFoundError(f"missing {base}.gz (or {base}) in {directory}")
  raw = path.read_bytes()
  if name.endswith(".gz"):
    try:
      content = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
  else:
    content = raw
  if verify:
    _verify_idx(path, raw, content, dataset, base)
  return parse_idx(content, str(path))


def _verify_idx(path: Path, raw: bytes, content: bytes, dataset: str, base: str) -> None:
  """By content, so a gunzipped or re-compressed copy passes; a .gz also by its own bytes."""
  gz_md5, content_md5 = _IDX_MD5[dataset][base]
  got = _md5(content)
  if got == content_md5 or (path.suffix == ".gz" and _md5(raw) == gz_md5):
    return
  raise DataError(f"{path}: checksum mismatch for {dataset} (content md5 {got}, published "
                  f"{content_md5}); the file is corrupt or from another dataset. Put the "
                  "original file there, or pass verify=False (--no-verify) to load it anyway.")


def load_idx_dir(dataset: str, directory: str | os.PathLike, verify: bool = True) -> Dataset:
  """MNIST or Fashion-MNIST from the four original IDX files (gzipped or not)."""
  directory = Path(directory)
  arrays = {k: _read_idx(directory, base, dataset, verify) for k, base in _IDX_FILES.items()}

  def split(images, labels):
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
      raise DataError(f"{directory}: expected 28x28 images and 1-D labels, got "
                      f"{images.shape} and {labels.shape}")
    if labels.max(initial=0) > 9:
      raise DataError(f"{directory}: label {labels.max()} out of range 0..9")
    return Split(images[..., None], labels.astype(np.int32))

  return Dataset(dataset, split(arrays["train_images"], arrays["train_labels"]),
                 split(arrays["test_images"], arrays["test_labels"]), 10, str(directory))
