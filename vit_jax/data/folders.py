"""Image folders as a dataset: `config.data_dir/SPLIT/CLASS/*.{jpg,jpeg,png}`.

Splits take TFDS slices ("train[:90%]", "train+val"); a fixed pseudo-random order of the
files makes slices mix the classes. Labels follow the training split's classes, and every
split is decoded to the training split's channel count. Files are read when a batch needs
them (in the input pipeline's workers) and cropped at full resolution (`PhotoSource`).
"""
from __future__ import annotations

import functools
import hashlib
import types
from pathlib import Path
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import errors
from vit_jax.data import decode
from vit_jax.data.sources import PhotoSource, read_file

_FOLDER_LAYOUT = "ROOT/SPLIT/CLASS/*.{jpg,jpeg,png}, e.g. ROOT/train/cat/001.jpg"


def load(config: ml_collections.ConfigDict, split: str) -> PhotoSource:
  """The files of ROOT/SPLIT/CLASS/*, read and cropped on demand."""
  if not config.data_dir:
    raise errors.DataError('config.dataset="folder" needs config.data_dir: the folder with '
                           f"the images, laid out as {_FOLDER_LAYOUT}.")
  root = Path(config.data_dir)
  # Labels follow the training split's classes, so that every split agrees on them.
  class_names = sorted(set().union(
      *(_class_dirs(root, name) for name, _ in _split_parts(config.train_split))))
  examples = [example for name, instruction in _split_parts(split)
              for example in _folder_examples(root, name, instruction, class_names,
                                              config.train_split)]
  if not examples:
    raise errors.DataError(f"Split {split!r} of {root} selects no images.")
  files = tuple(str(path) for path, _ in examples)
  labels = tuple(label for _, label in examples)
  channels = _training_channels(root, config.train_split, tuple(class_names))
  return PhotoSource.from_config(functools.partial(read_file, files, labels), len(files),
                                 config, channels=channels, class_names=class_names,
                                 name="folder", split=split)


@functools.cache
def _training_channels(root: Path, train_split: str, class_names: tuple[str, ...]) -> int:
  """3 if any training image is in colour, else 1: every split is decoded to it, so that a
  colour file among the test images of a greyscale dataset cannot change the input shape.

  Reads file headers only, and stops at the first colour file.
  """
  for name, instruction in _split_parts(train_split):
    for path, _ in _folder_examples(root, name, instruction, list(class_names), train_split):
      try:
        with Image.open(path) as pil:
          if not decode.is_grey(pil.mode):
            return 3
      except decode.PIL_READ_ERRORS:
        continue  # Decoding the split names the file.
  return 1


def _folder_examples(root: Path, name: str, instruction: Any, class_names: list[str],
                     train_split: str) -> list[tuple[Path, int]]:
  """(file, label) of ROOT/name/CLASS/* in a fixed order, sliced as `instruction` says."""
  class_dirs = _class_dirs(root, name)
  unknown = sorted(set(class_dirs) - set(class_names))
  if unknown:
    raise errors.DataError(
        f"Classes {unknown} in {root / name} are not in the training split "
        f"{train_split!r} (classes {class_names}): every class needs training images.")
  examples = sorted(
      ((path, class_names.index(cls)) for cls, folder in class_dirs.items()
       for path in _images_in(folder)),
      # A fixed pseudo-random order, so that slices like train[:90%] mix the classes.
      key=lambda example: hashlib.sha1(
          example[0].relative_to(root).as_posix().encode()).hexdigest())
  # TFDS's slice arithmetic reads only `num_examples` of each split's info.
  (absolute,) = instruction.to_absolute(
      {name: types.SimpleNamespace(num_examples=len(examples))})
  return examples[absolute.from_:absolute.to]


def _split_parts(split: str) -> list[tuple[str, Any]]:
  """(folder name, TFDS read instruction) per part of a split like "train[:90%]+val"."""
  parts = []
  for spec in split.split("+"):
    try:
      instruction = tfds.core.ReadInstruction.from_spec(spec.strip())
    except ValueError as e:
      raise errors.DataError(f"Cannot parse split {split!r}: use NAME or NAME[from:to] with "
                       f"counts or percents, e.g. 'train[:90%]'. ({e})") from None
    parts.append((instruction.split_name, instruction))
  return parts


def _class_dirs(root: Path, split_name: str) -> dict[str, Path]:
  folder = root / split_name
  if not folder.is_dir():
    raise errors.MissingDataError(f"No folder {folder}: the image folder dataset expects "
                            f"{_FOLDER_LAYOUT} (ROOT = config.data_dir = {root}).")
  class_dirs = {p.name: p for p in sorted(folder.iterdir())
                if p.is_dir() and not p.name.startswith(".")}
  if not class_dirs:
    raise errors.MissingDataError(f"No class folders in {folder}: the image folder dataset "
                            f"expects {_FOLDER_LAYOUT}.")
  return class_dirs


def _images_in(folder: Path) -> list[Path]:
  files = sorted(p for p in folder.iterdir()
                 if p.suffix.lower() in decode.IMAGE_EXTENSIONS and not p.name.startswith("."))
  if not files:
    raise errors.DataError(f"Class folder {folder} has no images "
                     f"({'/'.join(decode.IMAGE_EXTENSIONS)}): add some or remove the folder.")
  return files
