"""Input pipeline: random-access sources, deterministic resumable training batches, eval.

The same code feeds one CPU, GPUs or a TPU pod: every batch is a global `jax.Array`
split along the mesh's "data" axis, and each process reads only its own rows.

Public API:
  load_source(config, split) -> Source
      A TFDS dataset (`config.dataset`, prepared into `config.data_dir` on first use,
      from `config.manual_dir` when set) or an image folder (`config.dataset="folder"`,
      `config.data_dir/SPLIT/CLASS/*.{jpg,jpeg,png}`). Splits may be sliced, e.g.
      "train[:90%]". Small fixed-shape TFDS datasets are held in memory as stored
      (`ArraySource`). Folders, and TFDS datasets that are big (> 200k examples) or
      have images of varying size, are resized on the host to `config.load_size`
      (0 = image_size): read on demand where TFDS has array_record files
      (`StreamingSource`), otherwise decoded once into memory.
  Source: len(source), source.get(indices) -> dict(image=uint8[n,H,W,C], label=int32[n]),
      source.class_names, source.num_classes, source.image_shape,
      source.channel_mean_std() -> (mean[C], std[C]) in 0..255 pixel units.
  ArraySource(images, labels, class_names=...): a source over arrays already in memory.
  train_iterator(source, *, batch_size, seed, mesh, start_step=0, shuffle=True)
      -> TrainIterator: endless dict(image, label) batches; `get_state()` / `set_state()`
      save and restore the position (the step) so a resumed run sees the same batches.
  eval_batches(source, *, batch_size, mesh) -> EvalBatches: re-iterable; every example
      once, the last batch padded with zeros and marked by `mask`.
  epoch_order, global_batch_positions, process_slice: the index logic, pure functions.
  measure_input_throughput(config, mesh, num_batches=50, *, source=None) -> images/sec
      of the training iterator alone (no model).
Every data mistake a user can fix raises DataError (MissingDataError for absent files).
"""
from __future__ import annotations

import abc
import concurrent.futures
import difflib
import functools
import hashlib
import importlib.util
import itertools
import os
import queue
import shutil
import threading
import time
import types
import socket
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh
from PIL import Image

from vit_jax import errors, parallel

Batch = dict[str, np.ndarray]


class DataError(errors.UserError, ValueError):
  """A data mistake the user can fix (bad dataset name, split, image file, labels...):
  main.py prints its message as one line instead of a traceback."""


class MissingDataError(DataError, FileNotFoundError):
  """Data files that are not where the config says (folder, manual_dir)."""


# Beyond this many examples a split is read on demand instead of held in memory.
MAX_IN_MEMORY_EXAMPLES = 200_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_FOLDER_LAYOUT = "ROOT/SPLIT/CLASS/*.{jpg,jpeg,png}, e.g. ROOT/train/cat/001.jpg"
_READ_CHUNK = 4096  # Examples per tf.data batch when reading a split into memory.
_STATS_MAX_STREAMED = 10_000  # Streamed sources estimate mean/std from this many images.
_NUM_THREADS = min(32, os.cpu_count() or 1)


# --- Sources ---------------------------------------------------------------------


class Source(abc.ABC):
  """Random-access uint8 images of one fixed shape [H, W, C] and int32 labels."""

  def __init__(self, *, name: str, split: str, class_names: Sequence[str]):
    self.name = name
    self.split = split
    self.class_names = list(class_names)
    self._mean_std: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  @abc.abstractmethod
  def image_shape(self) -> tuple[int, int, int]:
    """[H, W, C] of every image."""

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def get(self, indices: np.ndarray) -> Batch:
    """Examples at `indices` (any order, repeats allowed) as image/label arrays."""

  def _stats_indices(self) -> np.ndarray:
    return np.arange(len(self))

  def channel_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32 [C], 0..255 units), accumulated in float64."""
    if self._mean_std is None:
      channels = self.image_shape[-1]
      total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
      indices = self._stats_indices()
      for start in range(0, len(indices), _READ_CHUNK):
        x = self.get(indices[start:start + _READ_CHUNK])["image"]
        x = x.reshape(-1, channels).astype(np.float64)
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        count += len(x)
      mean = total / count
      std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
      self._mean_std = mean.astype(np.float32), std.astype(np.float32)
    return self._mean_std

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.name}:{self.split}, {len(self)} examples, "
            f"{self.image_shape}, {self.num_classes} classes)")


class ArraySource(Source):
  """A split held in memory as arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               class_names: Sequence[str], name: str = "arrays", split: str = "train"):
    super().__init__(name=name, split=split, class_names=class_names)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise DataError(f"{name}:{split}: images must be uint8 [N, H, W, C], got "
                       f"{images.dtype} {images.shape}.")
    if len(images) != len(labels):
      raise DataError(f"{name}:{split}: {len(images)} images but {len(labels)} labels.")
    _check_labels(labels, self.num_classes, f"{name}:{split}")
    self.images = images
    self.labels = labels.astype(np.int32)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def get(self, indices: np.ndarray) -> Batch:
    return {"image": self.images[indices], "label": self.labels[indices]}


class StreamingSource(Source):
  """A split read record by record (e.g. a TFDS array_record data source).

  Each image is decoded on access and resized on the host to `load_size` squared,
  so images of any size come out with one shape.
  """

  def __init__(self, records: Sequence[dict[str, Any]], *, image_key: str, label_key: str,
               load_size: int, channels: int, class_names: Sequence[str], name: str,
               split: str):
    super().__init__(name=name, split=split, class_names=class_names)
    self.records = records
    self._keys = image_key, label_key
    self._shape = (load_size, load_size, channels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self._shape

  def __len__(self) -> int:
    return len(self.records)

  def _stats_indices(self) -> np.ndarray:
    # An even spread of examples: exact enough for normalisation, cheap for big data.
    n = len(self)
    return np.linspace(0, n - 1, min(n, _STATS_MAX_STREAMED)).astype(np.int64)

  def _read(self, index: int) -> tuple[np.ndarray, int]:
    record = self.records[int(index)]
    image_key, label_key = self._keys
    return _resize(np.asarray(record[image_key]), self._shape[0]), int(record[label_key])

  def get(self, indices: np.ndarray) -> Batch:
    examples = list(_thread_pool().map(self._read, indices))
    images = np.stack([im for im, _ in examples]) if examples else np.zeros(
        (0, *self._shape), np.uint8)
    labels = np.asarray([label for _, label in examples], np.int32)
    _check_labels(labels, self.num_classes, f"{self.name}:{self.split}", indices)
    return {"image": images, "label": labels}


@functools.cache
def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
  # Pillow releases the GIL while decoding and resizing, so threads scale.
  return concurrent.futures.ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="decode")


def _check_labels(labels: np.ndarray, num_classes: int, what: str,
                  indices: np.ndarray | None = None) -> None:
  """Labels must be class indices 0..num_classes-1: names the split and the bad values."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise DataError(f"{what}: labels must be class indices of shape [N], got shape "
                     f"{labels.shape} (one-hot labels are not supported).")
  if not len(labels):
    return
  if labels.dtype.kind not in "iub" and not np.array_equal(labels, np.round(labels)):
    raise DataError(f"{what}: labels must be whole numbers (class indices), got "
                     f"{labels.dtype} values such as {labels[labels != np.round(labels)][0]}.")
  outside = (labels < 0) | (labels >= num_classes)
  if outside.any():
    values = np.unique(labels[outside])
    shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    first = int(np.argmax(outside))
    first = first if indices is None else int(np.asarray(indices)[first])
    raise DataError(
        f"{what}: {int(outside.sum())} label(s) outside 0..{num_classes - 1} (there are "
        f"{num_classes} class names): {shown}; the first at example {first}. Check the "
        "labels or the list of class names.")


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """[h, w, C] uint8 -> [size, size, C], squashing the aspect ratio (bilinear)."""
  if image.shape[:2] == (size, size):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
  return resized.reshape(size, size, channels)


def load_source(config: ml_collections.ConfigDict, split: str) -> Source:
  """The examples of `split` of `config.dataset` (a TFDS name or "folder")."""
  if config.dataset == "folder":
    return _folder_source(config, split)
  return _tfds_source(config, split)


# --- Image folders ------------------------------------------------------------------


def _folder_source(config: ml_collections.ConfigDict, split: str) -> ArraySource:
  """Decodes ROOT/SPLIT/CLASS/* images once, resized (squashed) to load_size squared."""
  if not config.data_dir:
    raise DataError('config.dataset="folder" needs config.data_dir: the folder with '
                     f"the images, laid out as {_FOLDER_LAYOUT}.")
  root = Path(config.data_dir)
  # Labels follow the training split's classes, so that every split agrees on them.
  class_names = sorted(set().union(
      *(_class_dirs(root, name) for name, _ in _split_parts(config.train_split))))
  examples = [example for name, instruction in _split_parts(split)
              for example in _folder_examples(root, name, instruction, class_names,
                                              config.train_split)]
  if not examples:
    raise DataError(f"Split {split!r} of {root} selects no images.")
  size = config.load_size or config.image_size
  print(f"Decoding {len(examples)} images of {root}:{split} at {size}x{size} ...",
        flush=True)
  images = list(_thread_pool().map(functools.partial(decode_file, size=size),
                                   [path for path, _ in examples]))
  channels = _training_channels(root, config.train_split, tuple(class_names))
  images = [to_channels(im, channels) for im in images]
  return ArraySource(np.stack(images), np.asarray([label for _, label in examples]),
                     class_names=class_names, name="folder", split=split)


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
          if not _is_grey(pil.mode):
            return 3
      except _PIL_READ_ERRORS:
        continue  # Decoding the split names the file.
  return 1


def to_channels(image_HxWxC: np.ndarray, channels: int) -> np.ndarray:
  """Grey to RGB by repeating, RGB to grey as PIL's "L" (for folders and predict)."""
  if image_HxWxC.shape[-1] == channels:
    return image_HxWxC
  if channels == 3:
    return np.repeat(image_HxWxC, 3, axis=-1)
  return np.asarray(Image.fromarray(image_HxWxC).convert("L"))[..., None]


def _folder_examples(root: Path, name: str, instruction: Any, class_names: list[str],
                     train_split: str) -> list[tuple[Path, int]]:
  """(file, label) of ROOT/name/CLASS/* in a fixed order, sliced as `instruction` says."""
  class_dirs = _class_dirs(root, name)
  unknown = sorted(set(class_dirs) - set(class_names))
  if unknown:
    raise DataError(
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
      raise DataError(f"Cannot parse split {split!r}: use NAME or NAME[from:to] with "
                       f"counts or percents, e.g. 'train[:90%]'. ({e})") from None
    parts.append((instruction.split_name, instruction))
  return parts


def _class_dirs(root: Path, split_name: str) -> dict[str, Path]:
  folder = root / split_name
  if not folder.is_dir():
    raise MissingDataError(f"No folder {folder}: the image folder dataset expects "
                            f"{_FOLDER_LAYOUT} (ROOT = config.data_dir = {root}).")
  class_dirs = {p.name: p for p in sorted(folder.iterdir())
                if p.is_dir() and not p.name.startswith(".")}
  if not class_dirs:
    raise MissingDataError(f"No class folders in {folder}: the image folder dataset "
                            f"expects {_FOLDER_LAYOUT}.")
  return class_dirs


def _images_in(folder: Path) -> list[Path]:
  files = sorted(p for p in folder.iterdir()
                 if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
  if not files:
    raise DataError(f"Class folder {folder} has no images "
                     f"({'/'.join(IMAGE_EXTENSIONS)}): add some or remove the folder.")
  return files


# PIL's errors for files it cannot parse: OSError (UnidentifiedImageError, "image file is
# truncated"), ValueError, SyntaxError/EOFError from some format plugins, and images too
# large to be anything but a decompression bomb.
_PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _is_grey(pil_mode: str) -> bool:
  return pil_mode in ("1", "L", "LA", "La") or pil_mode.startswith("I")


def decode_file(path: Path, size: int) -> np.ndarray:
  """[size, size, 1] for grayscale files, [size, size, 3] for the rest (alpha dropped).

  16-bit grayscale (PNG mode I;16 or I) is scaled to 8 bits; PIL's own conversion would
  clip everything above 255 to white.
  """
  try:
    with Image.open(path) as pil:
      if pil.mode.startswith("I"):
        wide = np.asarray(pil).astype(np.int64)
        image = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
      else:
        image = np.asarray(pil.convert("L" if _is_grey(pil.mode) else "RGB"))
  except _PIL_READ_ERRORS as e:
    raise DataError(f"Cannot read image {path}: {e or type(e).__name__}. Replace or remove "
                     "the file.") from e
  return _resize(image.reshape(*image.shape[:2], -1), size)


# --- TFDS -----------------------------------------------------------------------------


def _tfds_source(config: ml_collections.ConfigDict, split: str) -> Source:
  builder = _prepared_builder(config)
  info = builder.info
  num_examples = _split_size(builder, split)
  image_key, label_key = _supervised_keys(info)
  shape = tuple(info.features[image_key].shape)
  common = dict(class_names=info.features[label_key].names, name=builder.name, split=split)
  if None not in shape and (num_examples or 0) <= MAX_IN_MEMORY_EXAMPLES:
    images, labels = _read_split(builder, split, image_key, label_key)
    return ArraySource(images, labels, **common)
  load_size = config.load_size or config.image_size
  if _has_array_record(info):
    return StreamingSource(builder.as_data_source(split=split), image_key=image_key,
                           label_key=label_key, load_size=load_size, channels=shape[-1],
                           **common)
  return _decode_to_memory(builder, split, image_key, label_key, load_size, common)


def _supervised_keys(info: tfds.core.DatasetInfo) -> tuple[str, str]:
  keys = info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return "image", "label"


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.DatasetNotFoundError:
    pass
  name = config.dataset.split(":")[0].split("/")[0]
  close = difflib.get_close_matches(
      name, tfds.list_builders(with_community_datasets=False) + ["folder"], n=3)
  hint = f" Did you mean: {', '.join(close)}?" if close else ""
  raise DataError(f"Unknown dataset {config.dataset!r}.{hint} Set config.dataset to a "
                   "TFDS name (tfds.list_builders()) or to 'folder' for an image folder "
                   "in config.data_dir.")


def _prepared_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of `config.dataset`, prepared in `config.data_dir` if it was not."""
  builder = _builder(config)
  if builder.is_prepared():
    return builder
  _hide_accelerators_from_tensorflow()
  if config.manual_dir:
    _check_manual_dir(builder, Path(config.manual_dir))
    print(f"Preparing {builder.name} in {builder.data_path} from manual_dir "
          f"{config.manual_dir} ...", flush=True)
    download_config = tfds.download.DownloadConfig(manual_dir=config.manual_dir,
                                                   try_download_gcs=False)
  else:
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      raise MissingDataError(
          f"{builder.name} cannot be downloaded: put its files in a folder and set "
          f"config.manual_dir to it.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    _check_download_hosts(builder)
    print(f"Downloading and preparing {builder.name} in {builder.data_path} ...",
          flush=True)
    download_config = tfds.download.DownloadConfig()
  # TFDS writes into an "incomplete" folder and renames it when done; what it made
  # around that (the dataset's parent folders) goes too, so no trace of a failed
  # build is left for a later run to trip over.
  new_dir = _first_missing_dir(builder)
  try:
    builder.download_and_prepare(
        download_config=download_config,
        file_format="array_record" if _streams(builder) and _array_record_installed()
        else None)
  except BaseException as e:
    if new_dir is not None:
      shutil.rmtree(new_dir, ignore_errors=True)
    if config.manual_dir or not isinstance(e, Exception):
      raise
    raise MissingDataError(
        f"Could not download {builder.name} ({type(e).__name__}: {e}). Without network, "
        f"put {_manual_files_hint(builder)} in a folder and set config.manual_dir to "
        "it.") from e
  return builder


def _resolve_host(host: str) -> None:
  """Raises OSError (socket.gaierror) when `host` has no address. Tests replace it: none
  of them may touch the network."""
  socket.getaddrinfo(host, 443)


# TFDS first looks for a prepared copy of the dataset on Google Cloud Storage.
_TFDS_GCS_HOST = "storage.googleapis.com"


def _check_download_hosts(builder: tfds.core.DatasetBuilder) -> None:
  """Stops at once when neither the dataset's download hosts nor TFDS's Cloud Storage
  resolve (no network): TFDS would retry each download with growing pauses for minutes
  before failing."""
  if urllib.request.getproxies():  # A proxy resolves the names itself.
    return
  urls = builder.url_infos or {}
  hosts = sorted({urllib.parse.urlparse(url).hostname for url in urls} - {None})
  failures = []
  for host in [*hosts, _TFDS_GCS_HOST] if hosts else []:
    try:
      _resolve_host(host)
      return  # Something answers: TFDS may get the data from there.
    except OSError as e:
      failures.append(f"{host} ({e})")
  if failures:
    raise MissingDataError(
        f"Cannot download {builder.name}: no host it downloads from resolves "
        f"({'; '.join(failures)}); no network? Without network, put "
        f"{_manual_files_hint(builder)} in a folder and set config.manual_dir to it.")


def _hide_accelerators_from_tensorflow() -> None:
  """TFDS runs TensorFlow on the host; on a GPU it would reserve memory JAX needs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Only to prepare/read.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow had already set up its devices.
    pass


def _streams(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the dataset is known before preparing to be read on demand."""
  image_key, _ = _supervised_keys(builder.info)
  splits = builder.info.splits
  return (None in builder.info.features[image_key].shape or
          any(s.num_examples > MAX_IN_MEMORY_EXAMPLES for s in splits.values()))


def _array_record_installed() -> bool:
  return importlib.util.find_spec("array_record") is not None


def _has_array_record(info: tfds.core.DatasetInfo) -> bool:
  return tfds.core.FileFormat.ARRAY_RECORD in info.available_file_formats()


def _expected_files(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The file names TFDS looks for in a manual_dir (from its checksum list)."""
  return sorted(info.filename or Path(urllib.parse.urlparse(url).path).name
                for url, info in (builder.url_infos or {}).items())


def _manual_files_hint(builder: tfds.core.DatasetBuilder) -> str:
  files = _expected_files(builder)
  return ", ".join(files) if files else "the files from the dataset's homepage"


def _check_manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: Path) -> None:
  # TFDS quietly downloads whatever it cannot find in the manual_dir: stop first.
  missing = [f for f in _expected_files(builder) if not (manual_dir / f).exists()]
  if missing:
    raise MissingDataError(
        f"{builder.name}: config.manual_dir={manual_dir} lacks {', '.join(missing)}. "
        f"Put {_manual_files_hint(builder)} there (or unset config.manual_dir to "
        "download).")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (
      manual_dir.is_dir() and any(manual_dir.iterdir())):
    raise MissingDataError(f"{builder.name}: config.manual_dir={manual_dir} is empty or "
                            f"missing.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def _first_missing_dir(builder: tfds.core.DatasetBuilder) -> Path | None:
  """The outermost folder of the dataset's data path that does not exist yet."""
  root, data_path = Path(builder.data_dir_root), Path(builder.data_path)
  for depth in range(1, len(data_path.relative_to(root).parts) + 1):
    path = root.joinpath(*data_path.relative_to(root).parts[:depth])
    if not path.exists():
      return path
  return None


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int | None:
  """Examples in `split`; None where TFDS does not know (e.g. under tfds mocks)."""
  splits = builder.info.splits
  if not splits:
    return None
  try:
    return splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise DataError(
        f"Cannot read split {split!r} of {builder.name} ({e}). Available splits: "
        f"{', '.join(splits)}; slices like 'train[:90%]' or 'train[90%:]' work too. "
        "Set config.train_split / eval_split / val_split accordingly.") from None


def _read_split(builder: tfds.core.DatasetBuilder, split: str, image_key: str,
                label_key: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole split as arrays, in the split's stored order."""
  if tfds.core.FileFormat.TFRECORD not in builder.info.available_file_formats():
    # Built in another format (array_record) that tf.data cannot read: go record by record.
    records = builder.as_data_source(split=split)
    examples = [records[i] for i in range(len(records))]
    return (np.stack([ex[image_key] for ex in examples]),
            np.asarray([ex[label_key] for ex in examples]))
  _hide_accelerators_from_tensorflow()
  # Keyword arguments only: tfds.testing.mock_data's stand-in accepts no others.
  dataset = builder.as_dataset(split=split, shuffle_files=False).batch(_READ_CHUNK)
  chunks = list(tfds.as_numpy(dataset))
  return (np.concatenate([c[image_key] for c in chunks]),
          np.concatenate([c[label_key] for c in chunks]))


def _decode_to_memory(builder: tfds.core.DatasetBuilder, split: str, image_key: str,
                      label_key: str, load_size: int, common: dict[str, Any]) -> ArraySource:
  """Streams a split without random access once, keeping it resized to load_size."""
  _hide_accelerators_from_tensorflow()
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  channels = builder.info.features[image_key].shape[-1]
  num_examples = len(dataset)
  needed = num_examples * load_size * load_size * channels
  available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if needed > available // 2:
    raise DataError(
        f"{builder.name}:{split}: {num_examples} images at {load_size}x{load_size}x"
        f"{channels} need {needed / 2**30:.1f} GiB, more than half of this machine's "
        f"memory. Lower config.load_size, or add array_record files for random access: "
        f"tfds convert_format --dataset_version_dir={builder.data_path} "
        "--out_file_format=array_record")
  print(f"Decoding {num_examples} images of {builder.name}:{split} at "
        f"{load_size}x{load_size} ...", flush=True)
  images = np.empty((num_examples, load_size, load_size, channels), np.uint8)
  labels = np.empty(num_examples, np.int32)
  examples = iter(tfds.as_numpy(dataset))
  start = 0
  while chunk := list(itertools.islice(examples, _READ_CHUNK)):
    resized = _thread_pool().map(lambda ex: _resize(ex[image_key], load_size), chunk)
    images[start:start + len(chunk)] = np.stack(list(resized))
    labels[start:start + len(chunk)] = [ex[label_key] for ex in chunk]
    start += len(chunk)
  return ArraySource(images, labels, **common)


# --- Index logic -------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples (a permutation)."""
  if not shuffle:
    order = np.arange(num_examples)
  else:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False  # Cached and shared: nobody may change it.
  return order


def global_batch_positions(step: int, batch_size: int) -> np.ndarray:
  """Positions of batch `step` in the endless concatenation of epoch orders."""
  return np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)


def process_slice(global_rows: np.ndarray, process_index: int,
                  process_count: int) -> np.ndarray:
  """The contiguous rows of a global batch that process `process_index` reads and holds."""
  if len(global_rows) % process_count:
    raise DataError(f"A batch of {len(global_rows)} does not split over "
                     f"{process_count} processes.")
  per_process = len(global_rows) // process_count
  return global_rows[process_index * per_process:(process_index + 1) * per_process]


def _example_indices(positions: np.ndarray, num_examples: int, seed: int,
                     shuffle: bool) -> np.ndarray:
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs):  # A batch may straddle epochs; never drop examples.
    rows = epochs == epoch
    indices[rows] = epoch_order(num_examples, seed, int(epoch), shuffle)[offsets[rows]]
  return indices


def _to_global(local: Batch, batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
  sharding = parallel.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
          for k, v in local.items()}


# --- Prefetching ----------------------------------------------------------------------------

_DONE = object()


def _produce(make_batch: Callable[[int], Any], steps: Iterator[int], out: queue.Queue,
             stop: threading.Event) -> None:
  """Thread body: batches in step order into `out` until `stop` or the steps run out."""

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  try:
    for step in steps:
      if not put(make_batch(step)):
        return
    put(_DONE)
  except BaseException as e:  # Re-raised in the consumer, where it can be seen.
    put(e)


class _Prefetcher:
  """Makes `make_batch(step)` for each step on a background thread, `depth` ahead."""

  def __init__(self, make_batch: Callable[[int], Any], steps: Iterator[int], depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    thread = threading.Thread(target=_produce, daemon=True, name="input-prefetch",
                              args=(make_batch, steps, self._queue, self._stop))
    thread.start()
    # Stops the thread when this object is closed, collected, or at interpreter exit.
    self._finalizer = weakref.finalize(self, _stop_thread, self._stop, thread)

  def next(self) -> Any:
    item = self._queue.get()
    if item is _DONE:
      self.close()
      raise StopIteration
    if isinstance(item, BaseException):
      self.close()
      raise item
    return item

  def close(self) -> None:
    self._finalizer()


def _stop_thread(stop: threading.Event, thread: threading.Thread) -> None:
  stop.set()
  if thread is not threading.current_thread():
    thread.join(timeout=10)


# --- Training and evaluation batches ---------------------------------------------------


class TrainIterator:
  """Endless, deterministic training batches: dict(image=uint8, label=int32) jax.Arrays.

  Batch `step` holds positions [step*B, (step+1)*B) of the concatenated epoch orders
  (`epoch_order`), so it depends only on (seed, step, len(source)): restoring the step
  is enough to resume, in O(1), on any number of processes.
  """

  def __init__(self, source: Source, *, batch_size: int, seed: int, mesh: Mesh,
               start_step: int = 0, shuffle: bool = True, prefetch: int = 2):
    parallel.check_batch_divides(batch_size)
    if not len(source):
      raise DataError(f"{source.name}:{source.split} has no examples to train on.")
    self.source = source
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    # Holds no reference to `self`, so a forgotten iterator can still be collected
    # (which stops its prefetch thread).
    self._make_batch = functools.partial(_train_batch, source, batch_size, seed, shuffle,
                                         mesh)
    self._depth = prefetch
    self._step = start_step
    self._prefetcher: _Prefetcher | None = None

  @property
  def step(self) -> int:
    """Batches produced so far (the step of the next batch)."""
    return self._step

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._prefetcher is None:
      self._prefetcher = _Prefetcher(self._make_batch, itertools.count(self._step),
                                     self._depth)
    try:
      batch = self._prefetcher.next()
    except BaseException:
      self.close()  # The next call starts over at this step (and meets the error again).
      raise
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; `set_state` of it resumes with the next batch."""
    return {"step": self._step, "seed": self.seed, "batch_size": self.batch_size,
            "num_examples": len(self.source), "shuffle": self.shuffle}

  def set_state(self, state: dict[str, Any]) -> None:
    mine = self.get_state()
    changed = {k: (state.get(k), v) for k, v in mine.items()
               if k != "step" and state.get(k) != v}
    if changed:
      details = ", ".join(f"{k}: saved {old}, now {new}" for k, (old, new) in changed.items())
      raise DataError(f"Cannot resume the input pipeline of a different run ({details}): "
                       "the batches would differ. Restore the original settings.")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops the prefetch thread; iterating again restarts it at the current step."""
    if self._prefetcher is not None:
      self._prefetcher.close()
      self._prefetcher = None

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def _train_batch(source: Source, batch_size: int, seed: int, shuffle: bool, mesh: Mesh,
                 step: int) -> dict[str, jax.Array]:
  positions = global_batch_positions(step, batch_size)
  local = process_slice(positions, jax.process_index(), jax.process_count())
  indices = _example_indices(local, len(source), seed, shuffle)
  return _to_global(source.get(indices), batch_size, mesh)


def train_iterator(source: Source, *, batch_size: int, seed: int, mesh: Mesh,
                   start_step: int = 0, shuffle: bool = True) -> TrainIterator:
  """Training batches of `source`; see `TrainIterator`."""
  return TrainIterator(source, batch_size=batch_size, seed=seed, mesh=mesh,
                       start_step=start_step, shuffle=shuffle)


class EvalBatches:
  """Every example of a source exactly once, in order: dict(image, label, mask).

  ceil(N / batch_size) batches on every process; the last is padded with zero images
  and label 0, marked False in `mask`. Iterate it again for each evaluation.
  """

  def __init__(self, source: Source, *, batch_size: int, mesh: Mesh, prefetch: int = 2):
    parallel.check_batch_divides(batch_size, "config.eval_batch_size")
    self.source = source
    self.batch_size = batch_size
    self._mesh = mesh
    self._depth = prefetch

  @property
  def num_examples(self) -> int:
    return len(self.source)

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    prefetcher = _Prefetcher(
        functools.partial(_eval_batch, self.source, self.batch_size, self._mesh),
        iter(range(len(self))), self._depth)
    try:
      while True:
        try:
          yield prefetcher.next()
        except StopIteration:
          return
    finally:
      prefetcher.close()


def _eval_batch(source: Source, batch_size: int, mesh: Mesh,
                index: int) -> dict[str, jax.Array]:
  positions = global_batch_positions(index, batch_size)
  local = process_slice(positions, jax.process_index(), jax.process_count())
  mask = local < len(source)
  examples = source.get(local[mask])
  if not mask.all():
    padded = {k: np.zeros((len(local), *v.shape[1:]), v.dtype) for k, v in examples.items()}
    for k, v in examples.items():
      padded[k][mask] = v
    examples = padded
  return _to_global({**examples, "mask": mask}, batch_size, mesh)


def eval_batches(source: Source, *, batch_size: int, mesh: Mesh) -> EvalBatches:
  """Evaluation batches of `source`; see `EvalBatches`."""
  return EvalBatches(source, batch_size=batch_size, mesh=mesh)


def measure_input_throughput(config: ml_collections.ConfigDict, mesh: Mesh,
                             num_batches: int = 50, *, source: Source | None = None) -> float:
  """Images/sec that the training iterator alone delivers (no model)."""
  source = source or load_source(config, config.train_split)
  with train_iterator(source, batch_size=config.batch_size, seed=config.seed,
                      mesh=mesh) as batches:
    jax.block_until_ready(next(batches))  # Starts the thread and fills first caches.
    start = time.perf_counter()
    for _ in range(num_batches):
      jax.block_until_ready(next(batches))
    elapsed = time.perf_counter() - start
  return num_batches * config.batch_size / elapsed
