"""Random-access sources of examples: uint8 images of one shape and int32 labels.

  Source: len(source), source.get(indices) -> dict(image=uint8[n,H,W,C], label=int32[n]),
      source.get_train(indices, positions, seed) (the training view), source.class_names,
      source.num_classes, source.image_shape, source.host_crops,
      source.channel_mean_std() -> (mean[C], std[C]) in 0..255 pixel units.
  ArraySource(images, labels, class_names=...): a source over arrays already in memory.
  StreamingSource(records, ...): fixed-shape images read record by record.
  PhotoSource(read, n, ...): encoded images of any size, decoded and cropped on access.
Every data mistake a user can fix raises errors.DataError (MissingDataError for absent
files).
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vit_jax import errors, host_memory
from vit_jax.data import decode, preprocess

Batch = dict[str, np.ndarray]

_STATS_CHUNK = 4096  # Examples per read when computing the channel statistics.
_STATS_MAX_STREAMED = 10_000  # Streamed sources estimate mean/std from this many images.


class Source(abc.ABC):
  """Random-access uint8 images of one fixed shape [H, W, C] and int32 labels.

  `host_crops`: whether the source crops, resizes and flips on the host (photos of any
  size); the device then leaves those steps out of its augmentation.
  """

  host_crops = False

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

  def get_train(self, indices: np.ndarray, positions: np.ndarray, seed: int) -> Batch:
    """Training examples at `indices`, which sit at `positions` of the run's order: sources
    that augment on the host draw from (seed, position); the others are `get`."""
    del positions, seed
    return self.get(indices)

  def _stats_indices(self) -> np.ndarray:
    return np.arange(len(self))

  def channel_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32 [C], 0..255 units), accumulated in float64."""
    if self._mean_std is None:
      channels = self.image_shape[-1]
      total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
      indices = self._stats_indices()
      for start in range(0, len(indices), _STATS_CHUNK):
        x = self.get(indices[start:start + _STATS_CHUNK])["image"]
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
      raise errors.DataError(f"{name}:{split}: images must be uint8 [N, H, W, C], got "
                       f"{images.dtype} {images.shape}.")
    if len(images) != len(labels):
      raise errors.DataError(f"{name}:{split}: {len(images)} images but {len(labels)} labels.")
    check_labels(labels, self.num_classes, f"{name}:{split}")
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
  """A split of fixed-shape images read record by record (e.g. a TFDS array_record data
  source too big to hold in memory)."""

  def __init__(self, records: Sequence[dict[str, Any]], *, image_key: str, label_key: str,
               image_shape: tuple[int, int, int], class_names: Sequence[str], name: str,
               split: str):
    super().__init__(name=name, split=split, class_names=class_names)
    self.records = records
    self._keys = image_key, label_key
    self._shape = tuple(image_shape)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self._shape

  def __len__(self) -> int:
    return len(self.records)

  def _stats_indices(self) -> np.ndarray:
    return _spread(len(self))

  def get(self, indices: np.ndarray) -> Batch:
    image_key, label_key = self._keys
    records = [self.records[int(i)] for i in indices]
    images = np.stack([np.asarray(r[image_key]) for r in records]) if records else np.zeros(
        (0, *self._shape), np.uint8)
    labels = np.asarray([int(r[label_key]) for r in records], np.int32)
    check_labels(labels, self.num_classes, f"{self.name}:{self.split}", indices)
    return {"image": images, "label": labels}


class PhotoSource(Source):
  """Encoded images of any size (JPEG/PNG files, TFDS records kept encoded), decoded on
  access and cropped on the host at full resolution to `size` squared.

  `get` gives the evaluation view (shorter side resized, central crop of
  `crop_fraction`); `get_train` the training view (random-resized crop when
  `inception`, else the evaluation view; then a random flip when `flip`), its randomness
  drawn per example from (seed, position in the run), so that it is the same on any number
  of processes and workers. `read(i)` -> (encoded bytes, label, name for errors).
  """

  host_crops = True

  def __init__(self, read: Callable[[int], tuple[bytes, int, str]], num_examples: int, *,
               size: int, channels: int, inception: bool, scale: tuple[float, float],
               flip: bool, crop_fraction: float, class_names: Sequence[str], name: str,
               split: str):
    super().__init__(name=name, split=split, class_names=class_names)
    self._read, self._len = read, num_examples
    self._shape = (size, size, channels)
    self._inception, self._scale, self._flip = inception, tuple(scale), flip
    self._crop_fraction = crop_fraction

  @classmethod
  def from_config(cls, read: Callable[[int], tuple[bytes, int, str]], num_examples: int,
                  config: Any, *, channels: int, class_names: Sequence[str], name: str,
                  split: str) -> PhotoSource:
    """At config.image_size, with the crops and flip of config.aug."""
    aug = config.aug
    return cls(read, num_examples, size=config.image_size, channels=channels,
               inception=aug.crop == "inception", scale=tuple(aug.crop_scale), flip=aug.flip,
               crop_fraction=aug.eval_crop_fraction, class_names=class_names, name=name,
               split=split)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self._shape

  def __len__(self) -> int:
    return self._len

  def _stats_indices(self) -> np.ndarray:
    return _spread(len(self))

  def _eval_view(self, index: int, out: np.ndarray) -> int:
    """Writes example `index`'s evaluation view into `out`; returns its label."""
    data, label, name = self._read(int(index))
    size, _, channels = self._shape
    preprocess.eval_crop(data, size=size, crop_fraction=self._crop_fraction,
                         channels=channels, name=name, out=out)
    return label

  def _train_view(self, index: int, seed: Sequence[int], out: np.ndarray) -> int:
    """Writes example `index`'s training view, drawn from `seed`, into `out`; returns its
    label."""
    rng = np.random.default_rng(seed)
    if not self._inception:
      label = self._eval_view(index, out)
      preprocess.flip_view(out, rng, self._flip)
      return label
    data, label, name = self._read(int(index))
    size, _, channels = self._shape
    preprocess.train_crop(data, rng, size=size, scale=self._scale, flip=self._flip,
                          channels=channels, name=name, out=out)
    return label

  def _batch(self, view: Callable[..., int], indices: np.ndarray, *args: Sequence[Any]
             ) -> Batch:
    """`view(indices[i], *(a[i] for a in args), images[i])` for every i, in the decoding
    threads: each writes its image straight into its row of one aligned batch (no stacking
    copy, and CPU devices take the batch without another: host_memory)."""
    images = host_memory.empty((len(indices), *self._shape), np.uint8)
    labels = np.asarray(list(decode.decode_pool().map(view, indices, *args, images)),
                        np.int32)
    check_labels(labels, self.num_classes, f"{self.name}:{self.split}", indices)
    return {"image": images, "label": labels}

  def get(self, indices: np.ndarray) -> Batch:
    return self._batch(self._eval_view, indices)

  def get_train(self, indices: np.ndarray, positions: np.ndarray, seed: int) -> Batch:
    return self._batch(self._train_view, indices, [(seed, int(p)) for p in positions])


def read_file(files: Sequence[str], labels: Sequence[int], index: int) -> tuple[bytes, int, str]:
  """A `PhotoSource` read of image files (here, not in `folders`: the input workers
  unpickle it without importing TFDS)."""
  path = files[index]
  return decode.read_image_bytes(path), labels[index], path


def _spread(n: int) -> np.ndarray:
  """An even spread of examples for the channel statistics: exact enough for
  normalisation, cheap for big data."""
  return np.linspace(0, n - 1, min(n, _STATS_MAX_STREAMED)).astype(np.int64)


def check_labels(labels: np.ndarray, num_classes: int, what: str,
                  indices: np.ndarray | None = None) -> None:
  """Labels must be class indices 0..num_classes-1: names the split and the bad values."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise errors.DataError(f"{what}: labels must be class indices of shape [N], got shape "
                     f"{labels.shape} (one-hot labels are not supported).")
  if not len(labels):
    return
  if labels.dtype.kind not in "iub" and not np.array_equal(labels, np.round(labels)):
    raise errors.DataError(f"{what}: labels must be whole numbers (class indices), got "
                     f"{labels.dtype} values such as {labels[labels != np.round(labels)][0]}.")
  outside = (labels < 0) | (labels >= num_classes)
  if outside.any():
    values = np.unique(labels[outside])
    shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    first = int(np.argmax(outside))
    first = first if indices is None else int(np.asarray(indices)[first])
    raise errors.DataError(
        f"{what}: {int(outside.sum())} label(s) outside 0..{num_classes - 1} (there are "
        f"{num_classes} class names): {shown}; the first at example {first}. Check the "
        "labels or the list of class names.")
