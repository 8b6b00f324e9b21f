"""Host-side crops of encoded photos at their full resolution, for datasets of any image size.

  train_crop  the inception (random-resized) crop, resized to size x size, random flip
  eval_crop   shorter side to size / crop_fraction, then the central size x size crop
  crop_box    the inception crop's box alone (torchvision's RandomResizedCrop.get_params)
  flip_view   the random left-right flip of a training view, in place

big_vision's ImageNet recipe: decode_jpeg_and_inception_crop (bilinear resize, no
antialiasing) for training, resize_small (area resampling) + central_crop for evaluation;
the box as torchvision and timm draw it. Written for grain worker processes: numpy, PIL (the
header, and the reason a file cannot be read) and OpenCV (decoding and resizing, with the
GIL released, so that threads scale); all randomness comes from the `rng` argument.

JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled DCT) when what is kept still has
at least the target's pixels on its shorter side there, so a small crop of a big photo costs
a fraction of a full decode. The box is chosen in full-resolution coordinates from the
header, so the crop does not depend on the scale the file was decoded at.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image

from vit_jax.data import decode

# Images are decoded in parallel by the input threads and workers; OpenCV's own thread pool
# on top of them would oversubscribe the cores.
cv2.setNumThreads(1)

# Aspect ratios (width / height) of the inception crop, as in torchvision and timm.
_RATIO = (3 / 4, 4 / 3)
# Box proposals tried before the fallback (torchvision, timm and big_vision all try 10).
_ATTEMPTS = 10
# JPEG DCT scalings libjpeg offers, largest reduction first.
_REDUCTIONS = (8, 4, 2)
# OpenCV's read flags: the colour (RGB, or grey), the reduction bits (libjpeg's scaled DCT),
# and the file as stored: EXIF orientation ignored, as TFDS, tf.data and PIL do.
_COLOUR = {3: cv2.IMREAD_COLOR_RGB, 1: cv2.IMREAD_GRAYSCALE}
_REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
            8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def crop_box(height: int, width: int, rng: np.random.Generator,
             scale: tuple[float, float]) -> tuple[int, int, int, int]:
  """(top, left, h, w) of an inception crop of a height x width image, in pixels.

  Area fraction ~ U(scale), aspect ratio log-uniform in [3/4, 4/3]; the first of 10 proposals
  that fits wins, else the centre crop of the whole image with its ratio clamped to
  [3/4, 4/3] (torchvision's RandomResizedCrop.get_params, drawn from `rng`).
  """
  # One draw per image whichever proposal wins, and plain floats: numpy's per-call cost
  # was a tenth of the whole crop.
  u = rng.random(2 * _ATTEMPTS + 2).tolist()
  low, high = math.log(_RATIO[0]), math.log(_RATIO[1])
  for area_u, ratio_u in zip(u[:_ATTEMPTS], u[_ATTEMPTS:2 * _ATTEMPTS]):
    area = height * width * (scale[0] + (scale[1] - scale[0]) * area_u)
    ratio = math.exp(low + (high - low) * ratio_u)
    w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < w <= width and 0 < h <= height:
      return int(u[-2] * (height - h + 1)), int(u[-1] * (width - w + 1)), h, w
  if width < height * _RATIO[0]:
    h, w = round(width / _RATIO[0]), width
  elif width > height * _RATIO[1]:
    h, w = height, round(height * _RATIO[1])
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def train_crop(data: bytes, rng: np.random.Generator, *, size: int, scale: tuple[float, float],
               flip: bool, channels: int, name: str, out: np.ndarray | None = None
               ) -> np.ndarray:
  """uint8 [size, size, channels]: an inception crop of the encoded image `data`, resized to
  size x size (bilinear, no antialiasing, as big_vision), then `flip`ped; written into `out`
  (e.g. a row of a batch) when given.

  `name` (a file path or "dataset:split[index]") names the example in a DataError.
  """
  height, width, is_jpeg = _header(data, name)
  top, left, h, w = crop_box(height, width, rng, scale)
  reduction = _reduction(min(h, w), size) if is_jpeg else 1
  x_HxWxC = _decode(data, channels, reduction, name)
  # The box at the decoded scale (libjpeg rounds the reduced size up; the box stays inside).
  top, left, bottom, right = (round(v / reduction) for v in (top, left, top + h, left + w))
  out = _output(out, size, channels)
  cv2.resize(x_HxWxC[top:bottom, left:right], (size, size), dst=out,
             interpolation=cv2.INTER_LINEAR)
  return flip_view(out, rng, flip)


def eval_crop(data: bytes, *, size: int, crop_fraction: float, channels: int,
              name: str, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [size, size, channels]: the image's shorter side resized to
  round(size / crop_fraction) (aspect ratio kept; area resampling), then its central
  size x size crop: big_vision's resize_small + central_crop. Written into `out` when given.
  """
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"crop_fraction must be in (0, 1], not {crop_fraction}.")
  height, width, is_jpeg = _header(data, name)
  shorter = round(size / crop_fraction)
  # Rounded as big_vision's resize_small rounds it.
  resized_h = round(height * shorter / min(height, width))
  resized_w = round(width * shorter / min(height, width))
  reduction = _reduction(min(height, width), shorter) if is_jpeg else 1
  resized = cv2.resize(_decode(data, channels, reduction, name), (resized_w, resized_h),
                       interpolation=cv2.INTER_AREA)
  top, left = (resized_h - size) // 2, (resized_w - size) // 2
  out = _output(out, size, channels)
  out[...] = resized[top:top + size, left:left + size].reshape(out.shape)
  return out


def flip_view(x_HxWxC: np.ndarray, rng: np.random.Generator, flip: bool) -> np.ndarray:
  """Flips the view left-right in place with probability 1/2 if `flip` (one draw from
  `rng`); returns it."""
  if flip and rng.random() < 0.5:
    cv2.flip(x_HxWxC, 1, dst=x_HxWxC)  # In place: numpy's x[:, ::-1] is a view to copy back.
  return x_HxWxC


def image_size_of(data: bytes, *, name: str) -> tuple[int, int]:
  """(height, width) of the encoded image `data`, read from its header only."""
  height, width, _ = _header(data, name)
  return height, width


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
  """Turns PIL's read errors (not an image, truncated, corrupt) into a DataError naming it."""
  try:
    yield
  except decode.PIL_READ_ERRORS as e:
    raise decode.read_error(name, e) from e


def _header(data: bytes, name: str) -> tuple[int, int, bool]:
  """(height, width, is it a JPEG) from the file's header."""
  size = _jpeg_size(data)
  if size:
    return *size, True
  with _reading(name):  # Other formats, and PIL's reason when it is no image at all.
    pil = Image.open(io.BytesIO(data))
  return pil.height, pil.width, pil.format == "JPEG"


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) from a JPEG's start-of-frame segment, else None; a few microseconds,
  where PIL's parse of every header segment takes 80."""
  if data[:2] != b"\xff\xd8":
    return None
  at = 2
  while at + 9 <= len(data) and data[at] == 0xFF:
    marker = data[at + 1]
    if marker == 0xFF:  # A fill byte.
      at += 1
    elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15.
      return (int.from_bytes(data[at + 5:at + 7], "big"),
              int.from_bytes(data[at + 7:at + 9], "big"))
    else:  # Any other segment: skip its length.
      at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
  return None


def _reduction(kept_shorter: int, target: int) -> int:
  """The largest JPEG reduction at which `kept_shorter` pixels still cover `target`."""
  return next((s for s in _REDUCTIONS if kept_shorter / s >= target), 1)


def _decode(data: bytes, channels: int, reduction: int, name: str) -> np.ndarray:
  """uint8 [h, w, 3] (RGB) or [h, w] (grey) of the encoded image, at 1/`reduction` scale.

  Grey files repeated to 3 channels and alpha dropped (OpenCV's rules, PIL's too); 16 bits
  scaled to 8 as `decode.to_8bit` does.
  """
  x = cv2.imdecode(np.frombuffer(data, np.uint8), _COLOUR[channels] | _REDUCED[reduction] |
                   cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION)
  if x is None:  # OpenCV gives no reason: PIL's, for the one-line error.
    with _reading(name):
      Image.open(io.BytesIO(data)).load()
    raise decode.read_error(name, ValueError("OpenCV cannot decode it"))
  # 16-bit files scaled as everywhere else (OpenCV alone would drop the low byte).
  return x if x.dtype == np.uint8 else decode.wide_to_8bit(x)


def _output(out: np.ndarray | None, size: int, channels: int) -> np.ndarray:
  """`out`, checked to be a uint8 [size, size, channels] array, or a new one."""
  shape = (size, size, channels)
  if out is None:
    return np.empty(shape, np.uint8)
  if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
    raise ValueError(f"out must be a C-contiguous uint8 array of shape {shape}, not "
                     f"{out.dtype} {out.shape}.")
  return out
