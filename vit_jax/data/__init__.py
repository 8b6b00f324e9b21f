"""The input side: where examples come from and how they reach the devices.

  load_source(config, split) -> Source: the one entry point to a dataset
  sources    Source / ArraySource / StreamingSource
  folders    image folders (config.dataset="folder")
  tfds_source  TFDS datasets: found by name, prepared on first use, read
  decode     image files decoded with PIL (also for predict)
  pipeline   deterministic resumable training batches, exact eval batches
  catalog    image shape and class count of known datasets without reading them
  augment    batched augmentation in JAX, inside the jitted train step, built on
  geometry   affine warps, and randaugment (RandAugment)

TFDS (and TensorFlow) are imported only by `folders` and `tfds_source`, when a dataset
is loaded: the rest runs without them.
"""
import ml_collections

from vit_jax.data.pipeline import (EvalBatches, TrainIterator, eval_batches,
                                   measure_input_throughput, train_iterator)
from vit_jax.data.sources import ArraySource, Source, StreamingSource


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


__all__ = ["ArraySource", "EvalBatches", "Source", "StreamingSource", "TrainIterator",
           "eval_batches", "load_source", "measure_input_throughput", "train_iterator"]
