"""Image files and arrays on the host: decoding with PIL, channels, resizing.

The modes and channel rules of every image read (`to_8bit`, `to_channels`, the one-line
`read_error`), shared by the photo crops (`preprocess`) and by predict's whole-image read
(`decode_file`, for runs on fixed-size datasets), so that a file is decoded the same way
wherever it comes from.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vit_jax import errors, paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_NUM_THREADS = min(32, os.cpu_count() or 1)


@functools.cache
def decode_pool() -> concurrent.futures.ThreadPoolExecutor:
  # Pillow releases the GIL while decoding and resizing, so threads scale.
  return concurrent.futures.ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="decode")


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """[h, w, C] uint8 -> [size, size, C], squashing the aspect ratio (bilinear)."""
  if image.shape[:2] == (size, size):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
  return resized.reshape(size, size, channels)


def to_channels(image_HxWxC: np.ndarray, channels: int) -> np.ndarray:
  """Grey to RGB by repeating, RGB to grey as PIL's "L" (for folders and predict)."""
  if image_HxWxC.shape[-1] == channels:
    return image_HxWxC
  if channels == 3:
    return np.repeat(image_HxWxC, 3, axis=-1)
  return np.asarray(Image.fromarray(image_HxWxC).convert("L"))[..., None]


# PIL's errors for files it cannot parse: OSError (UnidentifiedImageError, "image file is
# truncated"), ValueError, SyntaxError/EOFError from some format plugins, and images too
# large to be anything but a decompression bomb.
PIL_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def is_grey(pil_mode: str) -> bool:
  return pil_mode in ("1", "L", "LA", "La") or pil_mode.startswith("I")


def to_8bit(pil: Image.Image) -> Image.Image:
  """The image as 8-bit "L" (grey files) or "RGB" (the rest, alpha dropped).

  16-bit grayscale (PNG mode I;16 or I) is scaled to 8 bits; PIL's own conversion would
  clip everything above 255 to white.
  """
  if pil.mode.startswith("I"):
    return Image.fromarray(wide_to_8bit(np.asarray(pil)))
  mode = "L" if is_grey(pil.mode) else "RGB"
  return pil if pil.mode == mode else pil.convert(mode)


def wide_to_8bit(x: np.ndarray) -> np.ndarray:
  """16-bit (or wider) pixel values scaled to uint8, rounded: 65535 -> 255, 32768 -> 128."""
  return ((np.clip(x.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def read_error(name: object, error: Exception) -> errors.DataError:
  """The one-line error for an image file PIL cannot read; `name` is its path or example."""
  if isinstance(error, Image.UnidentifiedImageError):  # PIL's text names the BytesIO object.
    reason = "cannot identify image file"
  else:
    reason = " ".join(str(error).split()) or type(error).__name__
  return errors.DataError(f"Cannot read image {name}: {reason}. Replace or remove the file.")


def read_image_bytes(path: str) -> bytes:
  """The encoded bytes of an image file (local or remote), or a DataError naming it."""
  try:
    return paths.read_bytes(path)
  except FileNotFoundError:
    raise errors.DataError(f"Cannot read image {path}: there is no such file.") from None
  except OSError as e:  # A folder, no permission, an I/O error.
    raise read_error(path, e) from e


def decode_file(path: Path, size: int) -> np.ndarray:
  """[size, size, 1] for grayscale files, [size, size, 3] for the rest (alpha dropped)."""
  data = read_image_bytes(str(path))
  try:
    with Image.open(io.BytesIO(data)) as pil:
      image = np.asarray(to_8bit(pil))
  except PIL_READ_ERRORS as e:
    raise read_error(path, e) from e
  return resize(image.reshape(*image.shape[:2], -1), size)
