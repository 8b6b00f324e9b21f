"""Host-side crops of encoded photos at their full resolution, for datasets of any image size.

  train_crop  the inception (random-resized) crop, resized to size x size, random flip
  eval_crop   shorter side to size / crop_fraction, then the central size x size crop
  crop_box    the inception crop's box alone (torchvision's RandomResizedCrop.get_params)

As big_vision (decode_jpeg_and_inception_crop; resize_small + central_crop) and timm
(RandomResizedCrop; Resize + CenterCrop with crop_pct) do. Written for grain worker
processes: numpy and PIL only, and all randomness comes from the `rng` argument.

Only the box is resampled (PIL's resize with `box=`), and JPEGs are decoded at 1/2, 1/4 or
1/8 scale (PIL's draft mode: libjpeg's scaled DCT) when the box still has at least `size`
pixels on its shorter side there, so a small crop of a big photo costs a fraction of a full
decode. The box is chosen in full-resolution coordinates from the header, so the crop does
not depend on the scale the file was decoded at.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image

from vit_jax.data import decode

# Aspect ratios (width / height) of the inception crop, as in torchvision and timm.
_RATIO = (3 / 4, 4 / 3)
# Box proposals tried before the fallback (torchvision, timm and big_vision all try 10).
_ATTEMPTS = 10
# JPEG DCT scalings PIL's draft mode offers, largest reduction first.
_DRAFT_SCALES = (8, 4, 2)


def crop_box(height: int, width: int, rng: np.random.Generator,
             scale: tuple[float, float]) -> tuple[int, int, int, int]:
  """(top, left, h, w) of an inception crop of a height x width image, in pixels.

  Area fraction ~ U(scale), aspect ratio log-uniform in [3/4, 4/3]; the first of 10 proposals
  that fits wins, else the centre crop of the whole image with its ratio clamped to
  [3/4, 4/3] (torchvision's RandomResizedCrop.get_params, drawn from `rng`).
  """
  # All proposals at once: one draw of each kind per image, whichever proposal wins.
  area_N = height * width * rng.uniform(scale[0], scale[1], _ATTEMPTS)
  ratio_N = np.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1]), _ATTEMPTS))
  w_N = np.round(np.sqrt(area_N * ratio_N)).astype(np.int64)
  h_N = np.round(np.sqrt(area_N / ratio_N)).astype(np.int64)
  fits_N = (w_N > 0) & (w_N <= width) & (h_N > 0) & (h_N <= height)
  if fits_N.any():
    h, w = (int(v[np.argmax(fits_N)]) for v in (h_N, w_N))
    return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
  if width < height * _RATIO[0]:
    h, w = round(width / _RATIO[0]), width
  elif width > height * _RATIO[1]:
    h, w = height, round(height * _RATIO[1])
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def train_crop(data: bytes, rng: np.random.Generator, *, size: int, scale: tuple[float, float],
               flip: bool, channels: int, name: str) -> np.ndarray:
  """uint8 [size, size, channels]: an inception crop of the encoded image `data`, resized to
  size x size (bilinear, antialiased), flipped left-right with probability 1/2 if `flip`.

  `name` (a file path or "dataset:split[index]") names the example in a DataError.
  """
  with _reading(name):
    pil = Image.open(io.BytesIO(data))
  top, left, h, w = crop_box(pil.height, pil.width, rng, scale)
  x_SxSxC = _resize_box(pil, (left, top, left + w, top + h), size, channels, name)
  if flip and rng.random() < 0.5:
    x_SxSxC = np.ascontiguousarray(x_SxSxC[:, ::-1])
  return x_SxSxC


def eval_crop(data: bytes, *, size: int, crop_fraction: float, channels: int,
              name: str) -> np.ndarray:
  """uint8 [size, size, channels]: the image's shorter side resized to
  round(size / crop_fraction) (aspect ratio kept), then its central size x size crop.

  Computed as a resize of the matching box of the source, which gives the same pixels (up
  to float rounding) without resizing what the crop drops.
  """
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"crop_fraction must be in (0, 1], not {crop_fraction}.")
  with _reading(name):
    pil = Image.open(io.BytesIO(data))
  height, width = pil.height, pil.width
  shorter = round(size / crop_fraction)
  # The resized image, rounded as big_vision's resize_small rounds it.
  resized_h = round(height * shorter / min(height, width))
  resized_w = round(width * shorter / min(height, width))
  top, left = (resized_h - size) // 2, (resized_w - size) // 2
  # The crop in source pixels; multiplied first, so that an edge of the image maps onto it
  # exactly (PIL refuses a box even a rounding error outside the image).
  box = (width * left / resized_w, height * top / resized_h,
         width * (left + size) / resized_w, height * (top + size) / resized_h)
  return _resize_box(pil, box, size, channels, name)


def image_size_of(data: bytes, *, name: str) -> tuple[int, int]:
  """(height, width) of the encoded image `data`, read from its header only."""
  with _reading(name):
    pil = Image.open(io.BytesIO(data))
  return pil.height, pil.width


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
  """Turns PIL's read errors (not an image, truncated, corrupt) into a DataError naming it."""
  try:
    yield
  except decode.PIL_READ_ERRORS as e:
    raise decode.read_error(name, e) from e


def _draft_scale(box_shorter: float, size: int) -> int:
  """The largest JPEG reduction at which the box keeps at least `size` pixels a side."""
  return next((s for s in _DRAFT_SCALES if box_shorter / s >= size), 1)


def _resize_box(pil: Image.Image, box: tuple[float, float, float, float], size: int,
                channels: int, name: str) -> np.ndarray:
  """uint8 [size, size, channels]: the (left, top, right, bottom) box of the lazily opened
  `pil`, in full-resolution pixels, resized to size x size."""
  left, top, right, bottom = box
  width, height = pil.size
  want = _draft_scale(min(right - left, bottom - top), size)
  with _reading(name):
    # draft() only does something for JPEG (None otherwise). It returns the full image's
    # extent in the reduced image's pixels, (0, 0, width / s, height / s), which maps the box
    # exactly; the reduced image's size, ceil(width / s), would be off by a fraction.
    drafted = pil.draft(pil.mode, (width // want, height // want)) if want > 1 else None
    reduction = width / drafted[1][2] if drafted else 1
    resized = decode.to_8bit(pil).resize((size, size), Image.Resampling.BILINEAR,
                                         box=tuple(v / reduction for v in box))
  x_SxSxC = np.array(resized).reshape(size, size, -1)  # A writable copy.
  return decode.to_channels(x_SxSxC, channels)
