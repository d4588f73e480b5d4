"""CIFAR-10 and CIFAR-100 from the official python archive (`*-python.tar.gz`, checked
against its published MD5) or its extracted folder. The batches are pickles, read by an
unpickler that admits only numpy arrays, lists and dicts; their shapes and labels are checked."""

import codecs
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .common import DataError, Dataset, Split, _md5

_CIFAR = {
    "cifar10": dict(archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
                    md5="c58f30108f718f92721af3b95e74349a", label_key=b"labels", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"]),
    "cifar100": dict(archive="cifar-100-python.tar.gz", folder="cifar-100-python",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", label_key=b"fine_labels",
                     classes=100, train=["train"], test=["test"]),
}


def _numpy_reconstruct():
  core = getattr(np, "_core", None) or np.core
  return core.multiarray._reconstruct


class _ArrayOnlyUnpickler(pickle.Unpickler):
  """Admits only what CIFAR's pickles hold: dicts, lists, bytes, numpy arrays.

  (`_codecs.encode` is how Python 3 writes bytes at protocol 2; it only encodes
  a string and runs no code.)
  """

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR file holds "
                                   "only numpy arrays, lists and dicts")
    if name == "_reconstruct":
      return _numpy_reconstruct()
    return {"ndarray": np.ndarray, "dtype": np.dtype, "encode": codecs.encode}[name]


def safe_unpickle(data: bytes, what: str) -> dict:
  try:
    obj = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
  except pickle.UnpicklingError as e:
    raise DataError(f"{what}: {e}") from None
  except Exception as e:  # truncated or garbled pickles raise many kinds of errors
    raise DataError(f"{what}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise DataError(f"{what}: expected a dict, got {type(obj).__name__}")
  return obj


def _cifar_batch(obj: dict, label_key: bytes, classes: int, what: str) -> Split:
  data, labels = obj.get(b"data"), obj.get(label_key)
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise DataError(f"{what}: 'data' must be a uint8 array [N, 3072]")
  labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
  if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
    raise DataError(f"{what}: {label_key.decode()} must be {len(data)} labels in 0..{classes - 1}")
  return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32))


def load_cifar(dataset: str, directory: str | os.PathLike, verify: bool = True) -> Dataset:
  """CIFAR-10/100 from the python archive (`*-python.tar.gz`) or its extracted folder."""
  spec, directory = _CIFAR[dataset], Path(directory)
  archive, folder = directory / spec["archive"], directory / spec["folder"]
  if not folder.is_dir() and directory.name == spec["folder"]:
    folder = directory
  if archive.exists():
    raw = archive.read_bytes()
    if verify and _md5(raw) != spec["md5"]:
      raise DataError(f"{archive}: checksum mismatch (md5 {_md5(raw)}, published {spec['md5']}); "
                      "the archive is corrupt or truncated. Pass verify=False (--no-verify) to "
                      "load it anyway.")
    try:
      with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        members = {m.name.split("/")[-1]: m for m in tar.getmembers() if m.isfile()}
        read = lambda n: tar.extractfile(members[n]).read() if n in members else None
        files = {n: read(n) for n in spec["train"] + spec["test"]}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
      raise DataError(f"{archive}: corrupt or truncated archive ({e})") from None
    source = str(archive)
  elif folder.is_dir():
    files = {n: (folder / n).read_bytes() if (folder / n).exists() else None
             for n in spec["train"] + spec["test"]}
    source = str(folder)
  else:
    raise FileNotFoundError(f"neither {archive} nor {folder}/ exists")
  missing = [n for n, b in files.items() if b is None]
  if missing:
    raise FileNotFoundError(f"{source}: missing {', '.join(missing)}")

  def merge(names):
    parts = [_cifar_batch(safe_unpickle(files[n], f"{source}:{n}"), spec["label_key"],
                          spec["classes"], f"{source}:{n}") for n in names]
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))

  return Dataset(dataset, merge(spec["train"]), merge(spec["test"]), spec["classes"], source)
