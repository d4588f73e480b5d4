"""User arrays in one .npz file: round trips, dispatch, refusals; files written here."""

import pickle
import warnings

import numpy as np
import pytest

from noprop_jax import data
from noprop_jax.data import DataError

_TRIPPED: list[str] = []


def _trip():
  _TRIPPED.append("unpickled")  # runs only if something unpickles a _Trap
  return 0


class _Trap:
  def __reduce__(self):
    return (_trip, ())


def _arrays(n_train=8, n_test=4, shape=(5, 5, 3), dtype=np.uint8, classes=3, seed=0):
  rng = np.random.RandomState(seed)
  x = lambda n: (rng.randint(0, 256, (n, *shape)) if dtype == np.uint8 else rng.rand(n, *shape))
  # every class in both splits, so no "unseen class" warning unless a test asks for one
  y = lambda n: np.arange(n) % classes
  return dict(x_train=x(n_train).astype(dtype), y_train=y(n_train),
              x_test=x(n_test).astype(dtype), y_test=y(n_test))


def _write(tmp_path, name="mine.npz", **arrays):
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


def test_round_trip_uint8_images(tmp_path):
  arrays = _arrays()
  path = _write(tmp_path, "pics.npz", **arrays)
  ds = data.load_npz(path)
  assert ds.train.images.shape == (8, 5, 5, 3) and ds.train.images.dtype == np.uint8
  assert ds.test.images.shape == (4, 5, 5, 3) and ds.test.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train.images, arrays["x_train"])
  np.testing.assert_array_equal(ds.test.labels, arrays["y_test"])
  assert ds.train.labels.dtype == ds.test.labels.dtype == np.int32
  assert ds.num_classes == 3 and ds.name == "pics" and ds.source == str(path)


def test_round_trip_float_vectors(tmp_path):
  arrays = _arrays(shape=(7,), dtype=np.float64, classes=4)
  arrays["y_test"][0] = 5  # num_classes counts the test split too (with a warning: unseen)
  path = _write(tmp_path, "vectors.npz", **arrays)
  with pytest.warns(UserWarning, match=r"test classes \[5\] never appear in y_train"):
    ds = data.load_npz(str(path))
  assert ds.train.images.shape == (8, 7) and ds.train.images.dtype == np.float32
  np.testing.assert_allclose(ds.test.images, arrays["x_test"].astype(np.float32))
  np.testing.assert_array_equal(ds.test.labels, arrays["y_test"])
  assert ds.num_classes == 6 and ds.name == "vectors" and ds.source == str(path)


def test_floats_at_the_ends_of_0_1_are_accepted(tmp_path):
  arrays = _arrays(shape=(3,), dtype=np.float16)
  arrays["x_train"][0], arrays["x_test"][0] = 0.0, 1.0
  ds = data.load_npz(_write(tmp_path, **arrays))
  assert ds.train.images.dtype == ds.test.images.dtype == np.float32
  assert ds.train.images.min() == 0.0 and ds.test.images.max() == 1.0


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.int8])
def test_integer_inputs_other_than_uint8_are_refused(tmp_path, dtype):
  arrays = _arrays(shape=(2, 2))  # 0..255, as pixels saved without astype(np.uint8)
  arrays = {k: v.astype(dtype) if k.startswith("x") else v for k, v in arrays.items()}
  path = _write(tmp_path, **arrays)
  with pytest.raises(DataError, match=rf"{path}: x_train has dtype {np.dtype(dtype)}; store uint8 "
                     r"pixels \(0\.\.255\) or float in \[0, 1\]"):
    data.load_npz(path)


@pytest.mark.parametrize("lo, hi, key", [(-1.5, 1.0, "x_train"), (0.0, 255.0, "x_train"),
                                         (0.0, 1.0001, "x_test")])
def test_floats_outside_0_1_are_refused(tmp_path, lo, hi, key):
  arrays = _arrays(shape=(4,), dtype=np.float32)
  arrays[key][0, :2] = lo, hi
  path = _write(tmp_path, **arrays)
  with pytest.raises(DataError, match=rf"{path}: {key} holds floats from {lo:g} to "
                     rf"{hi:g}, outside \[0, 1\]; rescale .*min-max scale"):
    data.load_npz(path)


def test_load_dispatches_npz_paths(tmp_path):
  path = _write(tmp_path, **_arrays())
  for given in (str(path), path):
    ds = data.load(given)
    assert ds.name == "mine" and ds.train.images.shape == (8, 5, 5, 3)
  # an existing file without the suffix is a path too
  bare = tmp_path / "arrays"
  bare.write_bytes(path.read_bytes())
  assert data.load(str(bare)).name == "arrays"
  with pytest.raises(ValueError, match="is a .npz file holding both splits: drop --data-dir"):
    data.load(str(path), tmp_path)
  with pytest.raises(FileNotFoundError, match="gone.npz: no such file"):
    data.load(str(tmp_path / "gone.npz"))
  with pytest.raises(ValueError, match="or give the path of a .npz file"):
    data.load("not_a_dataset")


def test_named_datasets_win_over_files_with_their_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "digits").write_bytes(b"not a dataset")
  monkeypatch.setattr(data, "load_digits", lambda: "the embedded digits")  # skip sklearn's import
  assert data.load("digits") == "the embedded digits"


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz: no such file"):
    data.load_npz(tmp_path / "nope.npz")


def _corrupt(tmp_path, how):
  path = tmp_path / "bad.npz"
  if how == "garbage":
    path.write_bytes(b"this is not a zip file at all" * 4)
  elif how == "empty":
    path.write_bytes(b"")
  elif how == "truncated":
    np.savez_compressed(path, **_arrays())
    path.write_bytes(path.read_bytes()[:300])
  elif how == "npy":
    np.save(tmp_path / "one.npy", np.zeros(3))
    path.write_bytes((tmp_path / "one.npy").read_bytes())
  elif how == "pickle":
    path.write_bytes(pickle.dumps({"x_train": _Trap()}))
  return path


@pytest.mark.parametrize("how", ["garbage", "empty", "truncated", "npy", "pickle"])
def test_corrupt_file(tmp_path, how):
  _TRIPPED.clear()
  with pytest.raises(DataError, match=r"bad.npz: corrupt or not a .npz file"):
    data.load_npz(_corrupt(tmp_path, how))
  assert not _TRIPPED


def test_garbled_member(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez_compressed(path, **_arrays(n_train=200))
  raw = bytearray(path.read_bytes())
  raw[200:260] = bytes(60)  # inside x_train's compressed data; the zip directory stays intact
  path.write_bytes(bytes(raw))
  with pytest.raises(DataError, match="bad.npz: x_train is corrupt"):
    data.load_npz(path)


def test_object_array_is_refused_and_never_unpickled(tmp_path):
  arrays = _arrays()
  arrays["y_train"] = np.array([_Trap()] * 8, dtype=object)
  path = _write(tmp_path, **arrays)  # np.savez pickles object arrays
  _TRIPPED.clear()
  with pytest.raises(DataError, match="y_train is an object array .* refused"):
    data.load_npz(path)
  assert not _TRIPPED


def _edit(**changes):
  """An _arrays() edit: a value replaces a key, None drops it."""
  def apply(arrays):
    for k, v in changes.items():
      arrays.pop(k) if v is None else arrays.__setitem__(k, v(arrays) if callable(v) else v)
    return arrays
  return apply


_REFUSALS = {
    "missing keys": (_edit(x_test=None, y_test=None),
                     r"missing keys \['x_test', 'y_test'\] \(present: \['x_train', 'y_train'\]\)"),
    "length mismatch": (_edit(y_train=lambda a: a["y_train"][:-1]),
                        "x_train has 8 examples but y_train has 7 labels"),
    "empty split": (_edit(x_test=lambda a: a["x_test"][:0], y_test=np.array([])),
                    "the test split is empty"),
    "trailing shapes": (_edit(x_test=lambda a: a["x_test"][..., :1]),
                        r"x_train examples have shape \(5, 5, 3\) but x_test examples \(5, 5, 1\)"),
    "mixed uint8 and float": (_edit(x_test=lambda a: a["x_test"].astype(np.float32) / 255),
                              "x_train is uint8 but x_test is float32"),
    "float labels": (_edit(y_train=lambda a: a["y_train"].astype(np.float32)),
                     r"y_train has dtype float32 \(float labels are not accepted\); store integer "
                     "class indices"),
    "one-hot labels": (_edit(y_test=lambda a: np.eye(3, dtype=np.float32)[a["y_test"]]),
                       r"looks one-hot.*y_test.argmax\(axis=1\)"),
    "[N, 1] labels": (_edit(y_train=lambda a: a["y_train"][:, None]),
                      r"y_train must be 1-D \[N\] class indices, got shape \(8, 1\)"),
    "negative labels": (_edit(y_test=lambda a: a["y_test"] - 1),
                        r"y_test has 2 negative labels \(min -1\)"),
    "one class": (_edit(y_train=np.zeros(8, int), y_test=np.zeros(4, int)),
                  "only class 0; classification needs at least 2 classes"),
    "non-finite inputs": (_edit(x_train=lambda a: np.where(np.arange(3) == 0, np.nan,
                                                           a["x_train"] / 255.0),
                                x_test=lambda a: a["x_test"] / 255.0),
                          "x_train has 200 non-finite values"),
    "non-numeric inputs": (_edit(x_train=lambda a: a["x_train"] > 0,
                                 x_test=lambda a: a["x_test"] > 0),
                           "x_train has dtype bool; store uint8"),
    "int64 inputs": (_edit(x_train=lambda a: a["x_train"].astype(np.int64),
                           x_test=lambda a: a["x_test"].astype(np.int64)),
                     "x_train has dtype int64; store uint8 pixels"),
    "unscaled floats": (_edit(x_train=lambda a: a["x_train"].astype(np.float32),
                              x_test=lambda a: a["x_test"].astype(np.float32)),
                        r"x_train holds floats from 0 to 255, outside \[0, 1\]"),
}


@pytest.mark.parametrize("case", list(_REFUSALS))
def test_refusals(tmp_path, case):
  edit, message = _REFUSALS[case]
  path = _write(tmp_path, **edit(_arrays()))
  with pytest.raises(DataError, match=message) as e:
    data.load_npz(path)
  assert str(path) in str(e.value)  # every message names the file


def test_unseen_test_class_only_warns(tmp_path):
  arrays = _arrays()
  arrays["y_train"] = arrays["y_train"] % 2  # class 2 only in the test split
  with pytest.warns(UserWarning, match=r"test classes \[2\] never appear in y_train"):
    ds = data.load_npz(_write(tmp_path, **arrays))
  assert ds.num_classes == 3


def test_no_warning_when_every_test_class_is_trained(tmp_path):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data.load_npz(_write(tmp_path, **_arrays()))
