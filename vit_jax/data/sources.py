"""Random-access sources of examples: uint8 images of one shape and int32 labels.

  Source: len(source), source.get(indices) -> dict(image=uint8[n,H,W,C], label=int32[n]),
      source.class_names, source.num_classes, source.image_shape,
      source.channel_mean_std() -> (mean[C], std[C]) in 0..255 pixel units.
  ArraySource(images, labels, class_names=...): a source over arrays already in memory.
  StreamingSource(records, ...): one read record by record, decoded and resized on access.
Every data mistake a user can fix raises errors.DataError (MissingDataError for absent
files).
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

from vit_jax import errors
from vit_jax.data import decode

Batch = dict[str, np.ndarray]

_STATS_CHUNK = 4096  # Examples per read when computing the channel statistics.
_STATS_MAX_STREAMED = 10_000  # Streamed sources estimate mean/std from this many images.


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
    return decode.resize(np.asarray(record[image_key]), self._shape[0]), int(record[label_key])

  def get(self, indices: np.ndarray) -> Batch:
    examples = list(decode.decode_pool().map(self._read, indices))
    images = np.stack([im for im, _ in examples]) if examples else np.zeros(
        (0, *self._shape), np.uint8)
    labels = np.asarray([label for _, label in examples], np.int32)
    check_labels(labels, self.num_classes, f"{self.name}:{self.split}", indices)
    return {"image": images, "label": labels}


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
