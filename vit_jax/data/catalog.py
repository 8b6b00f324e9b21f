"""Image shape, classes and host cropping of datasets, known without reading (or downloading)
their images.

Bench mode times the train step on synthetic batches of the dataset's stored shape, on
machines that may not have the data, or TFDS at all.
"""
from __future__ import annotations

from typing import NamedTuple

import ml_collections

from vit_jax import errors

# (image shape HWC, classes) of datasets the benchmark knows without reading them.
KNOWN_DATASETS = {
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "kmnist": ((28, 28, 1), 10),
    "emnist": ((28, 28, 1), 62),
    "svhn_cropped": ((32, 32, 3), 10),
    "stl10": ((96, 96, 3), 10),
    "eurosat": ((64, 64, 3), 10),
    "resisc45": ((256, 256, 3), 45),
    "places365_small": ((256, 256, 3), 365),
}
# Datasets of photos of varying size are cropped on the host to config.image_size.
KNOWN_VARIABLE_SIZE = {
    "imagenet2012": 1000, "imagenet_v2": 1000, "imagenette": 10, "oxford_iiit_pet": 37,
    "oxford_flowers102": 102, "caltech101": 102, "food101": 101, "cars196": 196,
    "dtd": 47,
}


class Layout(NamedTuple):
  """What the compiled step of a dataset depends on."""
  image_shape: tuple[int, int, int]  # As stored (photos: config.image_size squared).
  num_classes: int
  host_crops: bool  # Photos of varying size, cropped on the host (`Source.host_crops`).


def dataset_shape(config: ml_collections.ConfigDict) -> Layout:
  """The Layout of config.dataset, without downloading.

  Known datasets come from the tables above; an image folder is read; another TFDS
  dataset must be prepared in config.data_dir (its info is read, TFDS imported here).
  """
  name = config.dataset.split(":")[0].split("/")[0]
  if name in KNOWN_DATASETS:
    shape, classes = KNOWN_DATASETS[name]
    return Layout(tuple(shape), classes, False)
  size = config.image_size
  if name in KNOWN_VARIABLE_SIZE:
    return Layout((size, size, 3), KNOWN_VARIABLE_SIZE[name], True)
  if name == "folder":
    from vit_jax.data import folders  # pylint: disable=g-import-not-at-top  # Imports TFDS.
    source = folders.load(config, config.train_split)
    return Layout(tuple(source.image_shape), source.num_classes, source.host_crops)
  try:  # A prepared TFDS dataset: its info is on disk.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    if builder.is_prepared():
      info = builder.info
      keys = info.supervised_keys
      image_key, label_key = keys if keys and len(keys) == 2 else ("image", "label")
      shape = tuple(info.features[image_key].shape)
      photos = None in shape  # Kept encoded and cropped on the host (tfds_source._photos).
      return Layout((size, size, shape[-1]) if photos else shape,
                    info.features[label_key].num_classes, photos)
  except Exception:  # pylint: disable=broad-except
    pass
  raise errors.ConfigError(
      f"config.dataset={config.dataset!r}: the benchmark does not know the image shape of "
      f"this dataset and it is not prepared in config.data_dir: use one of "
      f"{', '.join(sorted({**KNOWN_DATASETS, **KNOWN_VARIABLE_SIZE}))}, or prepare it "
      "first (e.g. one --mode=train run).")
