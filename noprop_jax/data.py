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
"""

import codecs
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

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


# ----------------------------------------------------------------------------- digits

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


# ----------------------------------------------------------------------------- MNIST-style IDX

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


def _md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


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


# ----------------------------------------------------------------------------- CIFAR

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


# ----------------------------------------------------------------------------- Tiny ImageNet

_TINY = dict(archive="tiny-imagenet-200.zip", folder="tiny-imagenet-200",
             md5="90528d7ca1a48142e341f4ef8d21d0de", size=64,
             url="http://cs231n.stanford.edu/tiny-imagenet-200.zip")
_JPEG = (".jpeg", ".jpg")


def _md5_file(path: Path) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def decode_rgb(data: bytes, size: int, what: str) -> np.ndarray:
  """One image file -> uint8 [size, size, 3]; grayscale and CMYK JPEGs are converted to RGB."""
  from PIL import Image

  try:
    im = Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises many kinds of errors for garbled files
    raise DataError(f"{what}: corrupt, truncated or not an image "
                    f"({type(e).__name__}: {e})") from None
  with im:
    if im.size != (size, size):
      raise DataError(f"{what}: image is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
    try:
      return np.asarray(im.convert("RGB"), np.uint8)
    except Exception as e:  # truncated or corrupt pixel data surfaces only on decoding
      raise DataError(f"{what}: corrupt or truncated image data "
                      f"({type(e).__name__}: {e})") from None


def _tiny_wnids(text: bytes | None, what: str) -> list[str]:
  if text is None:
    raise DataError(f"{what}: missing wnids.txt (the class list); not a Tiny ImageNet copy")
  wnids = [w.strip() for w in text.decode("utf-8", "replace").splitlines() if w.strip()]
  if not wnids or len(set(wnids)) != len(wnids):
    raise DataError(f"{what}: wnids.txt must list distinct class ids, one a line "
                    f"({len(wnids)} lines, {len(set(wnids))} distinct)")
  return wnids


def _tiny_val_labels(text: bytes | None, index: dict[str, int], what: str) -> dict[str, int]:
  if text is None:
    raise DataError(f"{what}: missing val/val_annotations.txt (the validation labels)")
  labels = {}
  for i, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
    if not line.strip():
      continue
    fields = line.rstrip().split("\t")
    if len(fields) < 2:
      raise DataError(f"{what}: line {i} is not 'filename<TAB>wnid<TAB>box': {line!r}")
    name, wnid = fields[0].strip(), fields[1].strip()
    if wnid not in index:
      raise DataError(f"{what}: line {i}: unknown wnid {wnid!r} (not in wnids.txt) for {name}")
    if name in labels:
      raise DataError(f"{what}: line {i}: {name} is annotated twice")
    labels[name] = index[wnid]
  if not labels:
    raise DataError(f"{what}: no annotations (the validation set would be empty)")
  return labels


def _tiny_split(files: list[tuple[str, int]], read, size: int, source: str) -> Split:
  images = np.empty((len(files), size, size, 3), np.uint8)
  for i, (rel, _) in enumerate(files):
    images[i] = decode_rgb(read(rel), size, f"{source}:{rel}")
  return Split(images, np.array([label for _, label in files], np.int32).reshape(-1))


def load_tiny_imagenet(directory: str | os.PathLike, verify: bool = True) -> Dataset:
  """Tiny ImageNet from `tiny-imagenet-200.zip` (read in place) or its extracted folder.

  Classes are numbered in wnids.txt's order; the test split is the labelled `val/`
  set (the official `test/` has no labels). Every image is decoded to 64x64 RGB.
  """
  spec, directory = _TINY, Path(directory)
  archive, folder = directory / spec["archive"], directory / spec["folder"]
  if not folder.is_dir() and directory.name == spec["folder"]:
    folder = directory
  zf = None
  if archive.exists():
    if verify and (md5 := _md5_file(archive)) != spec["md5"]:
      raise DataError(f"{archive}: checksum mismatch (md5 {md5}, published {spec['md5']}); "
                      "the archive is corrupt or truncated. Pass verify=False (--no-verify) to "
                      "load it anyway.")
    try:
      zf = zipfile.ZipFile(archive)
      members = [n for n in zf.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise DataError(f"{archive}: corrupt or truncated zip archive ({e})") from None
    prefix = spec["folder"] + "/" if spec["folder"] + "/wnids.txt" in members else ""
    names = [n[len(prefix):] for n in members if n.startswith(prefix)]
    present = set(names)
    source = str(archive)

    def read(rel):
      if rel not in present:
        return None
      try:
        return zf.read(prefix + rel)
      except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise DataError(f"{archive}:{prefix}{rel}: corrupt or truncated zip member ({e})") from None
  elif folder.is_dir():
    names = [p.relative_to(folder).as_posix()
             for pattern in ("train/*/images/*", "val/images/*") for p in folder.glob(pattern)]
    source = str(folder)
    read = lambda rel: (folder / rel).read_bytes() if (folder / rel).is_file() else None
  else:
    raise FileNotFoundError(f"neither {archive} nor {folder}/ exists")

  try:
    wnids = _tiny_wnids(read("wnids.txt"), source)
    index = {w: i for i, w in enumerate(wnids)}
    val_labels = _tiny_val_labels(read("val/val_annotations.txt"), index,
                                  f"{source}:val/val_annotations.txt")
    train, val_images = [], set()
    for rel in names:
      parts = rel.split("/")
      if not parts[-1].lower().endswith(_JPEG):
        continue
      if len(parts) == 4 and parts[0] == "train" and parts[2] == "images":
        if parts[1] not in index:
          raise DataError(f"{source}: train/{parts[1]}/ is not a class in wnids.txt")
        train.append((index[parts[1]], rel))
      elif len(parts) == 3 and parts[:2] == ["val", "images"]:
        val_images.add(parts[2])
    empty = sorted(set(wnids) - {wnids[label] for label, _ in train})
    if empty:
      raise DataError(f"{source}: no training images for {len(empty)} classes "
                      f"(train/{empty[0]}/images/ ...)")
    if val_images != set(val_labels):
      unlabelled = sorted(val_images - set(val_labels))
      missing = sorted(set(val_labels) - val_images)
      raise DataError(f"{source}: val/images/ and val/val_annotations.txt disagree: "
                      + (f"{unlabelled[0]} has no annotation" if unlabelled else
                         f"val/images/{missing[0]} is annotated but missing"))
    train_files = [(rel, label) for label, rel in sorted(train)]
    test_files = [(f"val/images/{n}", val_labels[n]) for n in sorted(val_labels)]
    return Dataset("tiny_imagenet", _tiny_split(train_files, read, spec["size"], source),
                   _tiny_split(test_files, read, spec["size"], source), len(wnids), source)
  finally:
    if zf is not None:
      zf.close()


# ----------------------------------------------------------------------------- user arrays (.npz)

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


# ----------------------------------------------------------------------------- TFDS and dispatch

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
