"""The input side: where examples come from and how they reach the devices.

  load_source(config, split) -> Source: the one entry point to a dataset
  sources    Source / ArraySource / StreamingSource
  folders    image folders (config.dataset="folder")
  tfds_source  TFDS datasets: found by name, prepared on first use, read
  decode     image files decoded with PIL (also for predict)
  preprocess host crops of photos at full resolution (train: random-resized; eval: centre)
  pipeline   deterministic resumable training batches, exact eval batches, on grain
  catalog    image shape and class count of known datasets without reading them
  augment    batched augmentation in JAX, inside the jitted train step, built on
  geometry   affine warps, and randaugment (RandAugment)

TFDS (and TensorFlow) are imported only by `folders` and `tfds_source`, when a dataset
is loaded: the rest runs without them.
"""
import ml_collections
import numpy as np

from vit_jax.data import augment
from vit_jax.data.pipeline import (EvalBatches, TrainIterator, eval_batches,
                                   measure_input_throughput, train_iterator)
from vit_jax.data.sources import ArraySource, PhotoSource, Source, StreamingSource


def load_source(config: ml_collections.ConfigDict, split: str) -> Source:
  """The examples of `split` of `config.dataset`: a TFDS dataset (`tfds_source`) or an image
  folder (`config.dataset="folder"`, `folders`). Splits may be sliced, e.g. "train[:90%]".

  TFDS is imported here, not at the top: bench mode and the model run without it.
  """
  if config.dataset == "folder":
    from vit_jax.data import folders  # pylint: disable=g-import-not-at-top
    return folders.load(config, split)
  from vit_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.load(config, split)


def normalization_stats(config: ml_collections.ConfigDict,
                        source: Source) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std (0..255 units) that `config.aug.normalize` maps to 0 and 1:
  the training set's, computed, for "dataset" (photos and streamed sets: from 10,000
  examples, decoded), else the constants the mode uses. The step reads them for "dataset"
  only; run.json records them."""
  channels = source.image_shape[-1]
  if config.aug.normalize == "dataset":
    return source.channel_mean_std()
  if config.aug.normalize == "imagenet":
    return (np.asarray(augment.IMAGENET_MEAN_C, np.float32),
            np.asarray(augment.IMAGENET_STD_C, np.float32))
  return np.full(channels, 127.5, np.float32), np.full(channels, 127.5, np.float32)


def for_device(config: ml_collections.ConfigDict, host_crops: bool) -> ml_collections.ConfigDict:
  """`config` with the augmentation the device still has to do: where the source crops and
  flips on the host (photos: `Source.host_crops`), only the rest."""
  if not host_crops:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if config.aug.crop == "inception":
      config.aug.crop = "none"
    config.aug.flip = False
    config.aug.eval_crop_fraction = 1.0
  return config


__all__ = ["ArraySource", "EvalBatches", "PhotoSource", "Source", "StreamingSource",
           "TrainIterator", "eval_batches", "for_device", "load_source",
           "measure_input_throughput", "train_iterator"]
