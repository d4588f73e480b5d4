"""Loaders on small files written here in the datasets' real formats."""

import gzip
import hashlib
import io
import os
import pickle
import sys
import tarfile
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from noprop_jax import data
from noprop_jax.data import DataError

from conftest import SHARED_MNIST


def _idx(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  return header + arr.astype(np.uint8).tobytes()


def _write_mnist(d, n_train=6, n_test=4, gz=True, seed=0):
  rng = np.random.RandomState(seed)
  arrays = {
      "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
      "train-labels-idx1-ubyte": rng.randint(0, 10, (n_train,)),
      "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)),
      "t10k-labels-idx1-ubyte": rng.randint(0, 10, (n_test,)),
  }
  for name, arr in arrays.items():
    raw = _idx(arr)
    if gz:
      (d / f"{name}.gz").write_bytes(gzip.compress(raw))
    else:
      (d / name).write_bytes(raw)
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_reads_the_real_format(tmp_path, gz):
  arrays = _write_mnist(tmp_path, gz=gz)
  ds = data.load("fashion_mnist", tmp_path, verify=False)
  assert ds.train.images.shape == (6, 28, 28, 1) and ds.train.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train-images-idx3-ubyte"])
  np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte"])
  assert ds.test.labels.dtype == np.int32


def test_idx_checksum_mismatch_is_refused(tmp_path):
  _write_mnist(tmp_path)
  with pytest.raises(DataError, match="checksum mismatch for mnist"):
    data.load("mnist", tmp_path)


def _md5(path) -> str:
  return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="../shared/data/mnist not present")
def test_uncompressed_mnist_is_refused_as_fashion_mnist(tmp_path):
  for base in data._IDX_FILES.values():  # gunzipped, as a user might leave them
    gz = Path(SHARED_MNIST) / f"{base}.gz"
    (tmp_path / base).write_bytes(gzip.decompress(gz.read_bytes()))
  path = tmp_path / "train-images-idx3-ubyte"
  with pytest.raises(DataError, match=rf"{path}: checksum mismatch for fashion_mnist "
                     rf"\(content md5 {_md5(path)}, published f4a8712d.*--no-verify"):
    data.load("fashion_mnist", tmp_path)
  assert data.load("mnist", tmp_path).train.images.shape == (60000, 28, 28, 1)  # MNIST's own
  assert data.load("fashion_mnist", tmp_path, verify=False).test.labels.shape == (10000,)


def test_random_uncompressed_idx_is_refused_as_fashion_mnist(tmp_path):
  arrays = _write_mnist(tmp_path, gz=False)  # valid IDX headers, random pixels and labels
  path = tmp_path / "train-images-idx3-ubyte"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # refused, not loaded with a warning
    with pytest.raises(DataError, match=rf"{path}: checksum mismatch for fashion_mnist "
                       rf"\(content md5 {_md5(path)}.*the original file.*--no-verify"):
      data.load("fashion_mnist", tmp_path)
  ds = data.load("fashion_mnist", tmp_path, verify=False)
  np.testing.assert_array_equal(ds.train.images[..., 0], arrays["train-images-idx3-ubyte"])


def test_uncompressed_fashion_mnist_is_verified_by_content(tmp_path, monkeypatch):
  _write_mnist(tmp_path, gz=False)
  published = {base: ("0" * 32, _md5(tmp_path / base)) for base in data._IDX_FILES.values()}
  monkeypatch.setitem(data._IDX_MD5, "fashion_mnist", published)  # as if these were the originals
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert data.load("fashion_mnist", tmp_path).train.images.shape == (6, 28, 28, 1)


def test_every_idx_file_has_both_published_md5s():
  for dataset, files in data._IDX_MD5.items():
    assert set(files) == set(data._IDX_FILES.values()), dataset
    assert all(len(m) == 32 for pair in files.values() for m in pair), dataset


def test_idx_corrupt_gzip(tmp_path):
  _write_mnist(tmp_path)
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
  with pytest.raises(DataError, match="corrupt or truncated gzip"):
    data.load("mnist", tmp_path, verify=False)


def test_idx_truncated_gzip_and_raw(tmp_path):
  _write_mnist(tmp_path)
  p = tmp_path / "train-images-idx3-ubyte.gz"
  p.write_bytes(p.read_bytes()[:-40])
  with pytest.raises(DataError, match="corrupt or truncated gzip"):
    data.load("mnist", tmp_path, verify=False)
  p.unlink()
  raw = _idx(np.zeros((6, 28, 28)))
  (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-100])
  with pytest.raises(DataError, match="truncated"):
    data.load("mnist", tmp_path, verify=False)


def test_idx_bad_magic(tmp_path):
  _write_mnist(tmp_path, gz=False)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
  with pytest.raises(DataError, match="bad magic"):
    data.load("mnist", tmp_path, verify=False)


def test_missing_files_say_what_to_put_where(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*Put .* in"):
    data.load("mnist", tmp_path)
  with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
    data.load("cifar10", tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    data.load("mnist", tmp_path / "nope")


def test_unknown_dataset_and_misplaced_data_dir(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    data.load("svhn")
  with pytest.raises(ValueError, match="digits is embedded"):
    data.load("digits", tmp_path)


def test_offline_without_data_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="--data-dir"):
    data.load("mnist", None, tfds_download=False, tfds_dir=str(tmp_path))


# ----------------------------------------------------------------------------- TensorFlow Datasets

def _tfds_records(tfds, name: str, n: int) -> dict:
  """Each split of `name` as TFDS's mock makes it from the dataset's features (no network,
  no TensorFlow): its records' images and labels, one numpy batch per split."""
  with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
    sources = dict(zip(("train", "test"), tfds.data_source(name, split=["train", "test"])))
    records = {s: [src[i] for i in range(len(src))] for s, src in sources.items()}
  return {s: [(np.stack([r["image"] for r in recs]), np.array([r["label"] for r in recs]))]
          for s, recs in records.items()}


@pytest.mark.parametrize("name, shape, classes", [
    ("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)])
def test_tfds_records_become_the_projects_arrays(name, shape, classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  batches = _tfds_records(tfds, name, 7)
  for split, n in (("train", 7), ("test", 7)):
    s = data.tfds_split(name, batches[split], split)
    assert s.images.shape == (n, *shape) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int32 and 0 <= s.labels.min() and s.labels.max() < classes
    np.testing.assert_array_equal(s.images, batches[split][0][0])
    np.testing.assert_array_equal(s.labels, batches[split][0][1])


def test_tfds_split_refuses_what_is_not_the_dataset():
  images, labels = np.zeros((4, 28, 28, 1), np.uint8), np.array([0, 1, 2, 10])
  with pytest.raises(DataError, match=r"mnist/train: expected 4 labels in 0\.\.9, got 4 in 0\.\.10"):
    data.tfds_split("mnist", [(images, labels)], "train")
  with pytest.raises(DataError, match="expected uint8 images"):
    data.tfds_split("mnist", [(images.astype(np.float32), labels % 10)], "train")
  with pytest.raises(DataError, match="the split is empty"):
    data.tfds_split("mnist", [], "test")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_through_mocked_tfds(name, tmp_path):
  """The whole no --data-dir path (tfds.load, batches, adapter); needs the tfds extra."""
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load(name, None, tfds_dir=str(tmp_path))
  assert ds.name == name and ds.num_classes == 10 and ds.source == "tensorflow_datasets"
  for s in (ds.train, ds.test):
    assert s.images.shape == (12, 28, 28, 1) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int32 and 0 <= s.labels.min() and s.labels.max() < 10


def _raises_module_not_found(module):
  def fail(*args, **kwargs):
    raise ModuleNotFoundError(f"No module named {module!r}", name=module)
  return fail


@pytest.mark.parametrize("where", ["inside tfds.load", "at import"])
def test_missing_tfds_module_says_what_to_install(where, monkeypatch):
  if where == "at import":  # tensorflow_datasets itself absent
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    module = "tensorflow_datasets"
  else:  # as TFDS 4.9 does while preparing: importlib_resources (then TensorFlow) imported lazily
    module = "importlib_resources"
    fake = types.SimpleNamespace(load=_raises_module_not_found(module), as_numpy=lambda d: d)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  with pytest.raises(DataError) as e:
    data.load("fashion_mnist")
  msg = str(e.value)
  assert "\n" not in msg
  assert f"needs the module '{module}'" in msg and "pip install -e '.[tfds]'" in msg, msg
  assert "--data-dir DIR holding the original files: train-images-idx3-ubyte.gz" in msg, msg


# ----------------------------------------------------------------------------- CIFAR

def _cifar_batch(n, classes, label_key, seed):
  rng = np.random.RandomState(seed)
  return {b"batch_label": b"x", label_key: rng.randint(0, classes, n).tolist(),
          b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"f"] * n}


def _write_cifar10(root, as_tar=True, n=3):
  batches = {f"data_batch_{i}": _cifar_batch(n, 10, b"labels", i) for i in range(1, 6)}
  batches["test_batch"] = _cifar_batch(n, 10, b"labels", 9)
  if as_tar:
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
      for name, obj in batches.items():
        payload = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
  else:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name, obj in batches.items():
      (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
  return batches


@pytest.mark.parametrize("as_tar", [True, False])
def test_cifar10_archive_and_folder(tmp_path, as_tar):
  batches = _write_cifar10(tmp_path, as_tar)
  ds = data.load("cifar10", tmp_path, verify=False)
  assert ds.train.images.shape == (15, 32, 32, 3) and ds.test.images.shape == (3, 32, 32, 3)
  row = batches["data_batch_1"][b"data"][0]  # channel-major: R plane, G plane, B plane
  assert ds.train.images[0, 0, 1, 0] == row[1] and ds.train.images[0, 0, 0, 2] == row[2048]
  np.testing.assert_array_equal(ds.test.labels, batches["test_batch"][b"labels"])


def test_cifar100_fine_labels(tmp_path):
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  for name, seed in (("train", 0), ("test", 1)):
    obj = _cifar_batch(4, 100, b"fine_labels", seed)
    obj[b"coarse_labels"] = [0] * 4
    (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
  ds = data.load("cifar100", tmp_path, verify=False)
  assert ds.num_classes == 100 and ds.train.labels.max() < 100


def test_cifar_checksum_and_corrupt_archive(tmp_path):
  _write_cifar10(tmp_path)
  with pytest.raises(DataError, match="checksum mismatch"):
    data.load("cifar10", tmp_path)
  p = tmp_path / "cifar-10-python.tar.gz"
  p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
  with pytest.raises(DataError, match="corrupt or truncated"):
    data.load("cifar10", tmp_path, verify=False)


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch /tmp/noprop_pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path):
  batches = _write_cifar10(tmp_path, as_tar=False)
  marker = "/tmp/noprop_pwned"
  if os.path.exists(marker):
    os.remove(marker)
  evil = dict(batches["test_batch"], evil=_Evil())
  (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
  with pytest.raises(DataError, match="refusing to load"):
    data.load("cifar10", tmp_path, verify=False)
  assert not os.path.exists(marker)


def test_cifar_truncated_pickle(tmp_path):
  _write_cifar10(tmp_path, as_tar=False)
  p = tmp_path / "cifar-10-batches-py" / "data_batch_3"
  p.write_bytes(p.read_bytes()[:500])
  with pytest.raises(DataError, match="data_batch_3"):
    data.load("cifar10", tmp_path, verify=False)


# ----------------------------------------------------------------------------- digits and real MNIST

def test_digits_split_is_fixed_and_stratified():
  a, b = data.load("digits"), data.load("digits")
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert len(a.train.labels) + len(a.test.labels) == 1797
  frac = np.bincount(a.test.labels, minlength=10) / (
      np.bincount(a.test.labels, minlength=10) + np.bincount(a.train.labels, minlength=10))
  assert np.all(np.abs(frac - 0.2) < 0.01)
  assert a.train.images.shape[1:] == (8, 8, 1)
  assert a.train.images.min() == 0.0 and a.train.images.max() == 1.0


def test_digits_are_scikit_learns_whether_read_from_its_file_or_through_it(monkeypatch):
  from sklearn.datasets import load_digits

  import sklearn.datasets

  want = load_digits()
  # This install has the file scikit-learn reads: read directly.
  assert data._sklearn_digits_file() == Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
  for found in (True, False):
    if not found:
      monkeypatch.setattr(data.digits, "_sklearn_digits_file", lambda: None)
    images, labels = data._digits_arrays()
    np.testing.assert_array_equal(images, want.images)
    np.testing.assert_array_equal(labels, want.target)


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="../shared/data/mnist not present")
def test_real_mnist_verifies():
  ds = data.load("mnist", SHARED_MNIST)  # one .gz re-compressed: verified by content
  assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.labels.shape == (10000,)
  assert np.bincount(ds.test.labels).tolist()[:3] == [980, 1135, 1032]


# ----------------------------------------------------------------------------- Tiny ImageNet

_TINY_WNIDS = ["n02", "n01", "n03"]  # not sorted: class index is wnids.txt's line order


def _jpeg(color, mode="RGB", size=(64, 64)) -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.new(mode, size, color).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _noise_jpeg() -> bytes:
  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)).save(
      buf, "JPEG", quality=95)
  return buf.getvalue()


def _tiny_files(gray_val=True):
  """Relative path -> bytes of a 3-class Tiny ImageNet: 2 train images a class, 3 val images."""
  files = {"wnids.txt": ("\n".join(_TINY_WNIDS) + "\n").encode(), "words.txt": b"n01\tthing\n"}
  for c, w in enumerate(_TINY_WNIDS):
    files[f"train/{w}/{w}_boxes.txt"] = b""
    for k in range(2):
      files[f"train/{w}/images/{w}_{k}.JPEG"] = _jpeg((40 * c + 10 * k, 100, 200))
  files["train/n03/images/n03_1.JPEG"] = _jpeg((0, 255, 255, 0), "CMYK")  # pure red
  val = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n02"), ("val_2.JPEG", "n01")]
  for i, (name, _) in enumerate(val):
    gray = gray_val and i == 1
    files[f"val/images/{name}"] = _jpeg(30 + 50 * i, "L") if gray else _jpeg((9, 9, 9))
  files["val/val_annotations.txt"] = "".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val).encode()
  files["test/images/test_0.JPEG"] = _jpeg((1, 2, 3))  # unlabelled: ignored
  return files


def _write_tiny(root, files, as_zip=True):
  if as_zip:
    with zipfile.ZipFile(root / "tiny-imagenet-200.zip", "w") as zf:
      for rel, payload in files.items():
        zf.writestr(f"tiny-imagenet-200/{rel}", payload)
  else:
    for rel, payload in files.items():
      path = root / "tiny-imagenet-200" / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(payload)


@pytest.mark.parametrize("as_zip", [True, False])
def test_tiny_imagenet_archive_and_folder(tmp_path, as_zip):
  _write_tiny(tmp_path, _tiny_files(), as_zip)
  ds = data.load("tiny_imagenet", tmp_path, verify=False)
  assert ds.num_classes == 3 and ds.name == "tiny_imagenet"
  assert ds.train.images.shape == (6, 64, 64, 3) and ds.train.images.dtype == np.uint8
  assert ds.test.images.shape == (3, 64, 64, 3) and ds.test.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train.labels, [0, 0, 1, 1, 2, 2])  # wnids.txt order
  assert abs(int(ds.train.images[2, 5, 5, 0]) - 40) <= 3  # class 1 ("n01"), k = 0
  assert np.abs(ds.train.images[5, 0, 0].astype(int) - [255, 0, 0]).max() <= 3  # CMYK -> RGB
  np.testing.assert_array_equal(ds.test.labels, [2, 0, 1])  # n03, n02, n01 per the annotations
  gray = ds.test.images[1].astype(int)  # the grayscale JPEG, converted to RGB
  assert abs(gray[0, 0, 0] - 80) <= 3 and (gray[..., 0] == gray[..., 2]).all()


def test_tiny_imagenet_folder_given_directly(tmp_path):
  _write_tiny(tmp_path, _tiny_files(), as_zip=False)
  ds = data.load("tiny_imagenet", tmp_path / "tiny-imagenet-200", verify=False)
  assert ds.train.images.shape == (6, 64, 64, 3)


def test_tiny_imagenet_checksum_and_corrupt_zip(tmp_path):
  _write_tiny(tmp_path, _tiny_files())
  with pytest.raises(DataError, match="checksum mismatch"):
    data.load("tiny_imagenet", tmp_path)
  p = tmp_path / "tiny-imagenet-200.zip"
  p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
  with pytest.raises(DataError, match="corrupt or truncated zip"):
    data.load("tiny_imagenet", tmp_path, verify=False)


@pytest.mark.parametrize("rel, payload, match", [
    ("train/n01/images/n01_1.JPEG", _jpeg((1, 2, 3))[:200], r"n01_1\.JPEG: corrupt, truncated"),
    ("train/n03/images/n03_0.JPEG", _noise_jpeg()[:2500], r"n03_0\.JPEG: corrupt or truncated"),
    ("val/images/val_2.JPEG", b"not a jpeg", r"val_2\.JPEG: corrupt, truncated or not an image"),
    ("val/images/val_0.JPEG", _jpeg((1, 2, 3), size=(64, 32)), r"val_0\.JPEG: image is 64x32"),
    ("val/val_annotations.txt", b"val_0.JPEG\tn09\t0\t0\t1\t1\n", "unknown wnid 'n09'"),
    ("wnids.txt", None, "missing wnids.txt"),
])
def test_tiny_imagenet_bad_files(tmp_path, rel, payload, match):
  files = _tiny_files()
  if payload is None:
    del files[rel]
  else:
    files[rel] = payload
  _write_tiny(tmp_path, files)
  with pytest.raises(DataError, match=match):
    data.load("tiny_imagenet", tmp_path, verify=False)


def test_tiny_imagenet_missing_says_what_to_put_where(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tiny-imagenet-200\.zip.*Put .* in"):
    data.load("tiny_imagenet", tmp_path)
  with pytest.raises(FileNotFoundError, match="Datasets does not provide it.*--data-dir"):
    data.load("tiny_imagenet", None)
