"""Tiny ImageNet from `tiny-imagenet-200.zip` (downloaded by the user from cs231n; checked
against its published MD5 and read in place) or its extracted folder. Checked: the class
list, the validation annotations against the images present, and every JPEG decodes to 64x64."""

import hashlib
import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .common import DataError, Dataset, Split

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
