"""Host-side crops at full source resolution (vit_jax.data.preprocess)."""
import io
import math
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from vit_jax import errors
from vit_jax.data import preprocess
from conftest import REPO

AREA = Image.Resampling.BOX  # PIL's area (box-average) resampling.


def encode(image_HxWxC: np.ndarray, fmt: str = "PNG", **options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image_HxWxC.squeeze(-1) if image_HxWxC.shape[-1] == 1 else image_HxWxC
                  ).save(buffer, fmt, **options)
  return buffer.getvalue()


def smooth_photo(height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3]: gradients and a slow wave, so no two regions look alike."""
  y_HxW, x_HxW = np.mgrid[0:height, 0:width]
  return np.stack([x_HxW * 255 / width, y_HxW * 255 / height,
                   128 + 100 * np.sin(x_HxW / 60) * np.cos(y_HxW / 45)], -1).astype(np.uint8)


def uniform(height: int, width: int, colour) -> np.ndarray:
  return np.broadcast_to(np.array(colour, np.uint8).reshape(1, 1, -1), (height, width, len(colour)))


# --- Shapes, channels and file modes -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("file_colour", [(200, 100, 50), (120,)], ids=["rgb_file", "grey_file"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_and_channels(fmt, file_colour, channels):
  data = encode(uniform(30, 40, file_colour), fmt)
  # Grey files are repeated to RGB; colour files become PIL's "L" (299 R + 587 G + 114 B).
  grey = 120 if len(file_colour) == 1 else round(200 * .299 + 100 * .587 + 50 * .114)
  expected = (grey,) * channels if len(file_colour) == 1 or channels == 1 else file_colour
  for out in (preprocess.train_crop(data, np.random.default_rng(0), size=16, scale=(0.3, 1),
                                    flip=True, channels=channels, name="a.png"),
              preprocess.eval_crop(data, size=16, crop_fraction=0.875, channels=channels,
                                   name="a.png")):
    assert out.shape == (16, 16, channels) and out.dtype == np.uint8
    np.testing.assert_allclose(out.reshape(-1, channels).mean(0), expected, atol=3)
  assert preprocess.image_size_of(data, name="a.png") == (30, 40)


@pytest.mark.parametrize("mode, options", [
    ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}),
    ("RGB", {"exif": b"Exif\x00\x00" + bytes(60_000)})],  # A long segment before the frame.
    ids=["progressive", "grey", "cmyk", "long_exif"])
def test_jpeg_size_is_read_from_the_frame_header(mode, options):
  buffer = io.BytesIO()
  Image.new(mode, (123, 45)).save(buffer, "JPEG", **options)
  assert preprocess.image_size_of(buffer.getvalue(), name="h.jpg") == (45, 123)


@pytest.mark.parametrize("mode, value, expected", [
    ("I;16", 32768, (128,)),  # 16-bit grey is scaled to 8 bits, not clipped to white.
    ("I;16", 65535, (255,)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # Alpha dropped, even where transparent.
    ("P", None, (255, 0, 0)),
])
def test_png_modes(mode, value, expected):
  if mode == "P":
    pil = Image.new("RGB", (24, 20), (255, 0, 0)).convert("P")
  elif mode == "I;16":
    pil = Image.fromarray(np.full((20, 24), value, np.uint16))
  else:
    pil = Image.new(mode, (24, 20), value)
  buffer = io.BytesIO()
  pil.save(buffer, "PNG")
  channels = len(expected)
  out = preprocess.train_crop(buffer.getvalue(), np.random.default_rng(0), size=8,
                              scale=(0.5, 1), flip=False, channels=channels, name="m.png")
  np.testing.assert_array_equal(out, np.broadcast_to(expected, (8, 8, channels)))


def test_same_seed_same_crop_other_seed_other_crop():
  data = encode(smooth_photo(120, 160), "JPEG")

  def crop(seed):
    return preprocess.train_crop(data, np.random.default_rng(seed), size=32, scale=(0.08, 1),
                                 flip=True, channels=3, name="d.jpg")
  assert crop(7).tobytes() == crop(7).tobytes()
  assert len({crop(seed).tobytes() for seed in range(5)}) == 5


# --- The crop box --------------------------------------------------------------------------


def test_crop_box_statistics():
  rng = np.random.default_rng(0)
  boxes_Nx4 = np.array([preprocess.crop_box(375, 500, rng, (0.08, 1)) for _ in range(400)])
  top_N, left_N, h_N, w_N = boxes_Nx4.T
  assert (top_N >= 0).all() and (left_N >= 0).all()
  assert (top_N + h_N <= 375).all() and (left_N + w_N <= 500).all()
  fraction_N = h_N * w_N / (375 * 500)
  ratio_N = w_N / h_N
  assert fraction_N.min() >= 0.08 * 0.99 and fraction_N.max() <= 1
  assert ratio_N.min() >= 3 / 4 * 0.99 and ratio_N.max() <= 4 / 3 * 1.01  # Integer rounding.
  # Not the 0.54 of U(0.08, 1): a box of area fraction f fits this 4:3 image only when its
  # ratio is >= 4f/3 (its height fits), so boxes above f = 9/16 are often rejected and
  # redrawn. The first box accepted has density proportional to the chance P(f) it fits.
  f = np.linspace(0.08, 1, 10001)
  fits = np.clip(-np.log(f) / math.log(16 / 9), 0, 1)
  assert fraction_N.mean() == pytest.approx((f * fits).sum() / fits.sum(), abs=0.03)  # 0.432
  # Boxes up to f = 1/2 all fit: U(0.08, 0.5) itself, mean 0.29.
  small_N = np.array([np.prod(preprocess.crop_box(375, 500, rng, (0.08, 0.5))[2:]) / 187500
                      for _ in range(400)])
  assert small_N.mean() == pytest.approx(0.29, abs=0.02)
  # Positions spread over the whole free range.
  assert top_N.min() < 10 and (375 - h_N - top_N).min() < 10


def test_crop_box_fallback_is_the_centred_clamped_box():
  # No box of the whole area has a ratio in [3/4, 4/3] on a 3:1 image: torchvision's fallback.
  rng = np.random.default_rng(0)
  assert preprocess.crop_box(100, 300, rng, (1.0, 1.0)) == (0, 83, 100, 133)
  assert preprocess.crop_box(300, 100, rng, (1.0, 1.0)) == (83, 0, 133, 100)
  assert preprocess.crop_box(90, 100, rng, (1.0, 1.0)) == (0, 0, 90, 100)  # 10:9 fits.


# --- Reduced JPEG decoding -----------------------------------------------------------------


@pytest.fixture
def reductions(monkeypatch):
  """The reduction (1, 2, 4 or 8) each decode asked OpenCV for (libjpeg's scaled DCT)."""
  used = []
  original = cv2.imdecode

  def spy(buffer, flags):
    used.append({0: 1, 16: 2, 32: 4, 64: 8}[flags & 0x70])  # The IMREAD_REDUCED_* bits.
    return original(buffer, flags)
  monkeypatch.setattr(cv2, "imdecode", spy)
  return lambda: used


def bilinear(image_HxWxC: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resampling at half-pixel centres, without antialiasing: tf.image.resize's
  default (big_vision's), written out in numpy as an independent reference."""
  def taps(n_in, n_out):
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(x).astype(int)
    return low, np.minimum(low + 1, n_in - 1), x - low
  y0, y1, wy = taps(image_HxWxC.shape[0], height)
  x0, x1, wx = taps(image_HxWxC.shape[1], width)
  f = image_HxWxC.astype(np.float64)
  wy, wx = wy[:, None, None], wx[None, :, None]
  top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
  bottom = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


@pytest.fixture(scope="module")
def photo_jpeg():
  data = encode(smooth_photo(750, 1000), "JPEG", quality=95)
  return data, Image.open(io.BytesIO(data)).convert("RGB")  # The full-resolution decode.


@pytest.mark.parametrize("scale, size, reduction", [
    ((0.02, 0.02), 32, 2), ((0.08, 0.08), 32, 4), ((0.5, 0.5), 32, 8), ((0.5, 0.5), 400, 1)])
def test_train_reduced_decode_matches_full_decode(photo_jpeg, reductions, scale, size, reduction):
  data, full = photo_jpeg
  # The box is drawn first from the generator: replaying the seed gives train_crop's box.
  top, left, h, w = preprocess.crop_box(750, 1000, np.random.default_rng(3), scale)
  assert max(s for s in (1, 2, 4, 8) if min(h, w) / s >= size) == reduction
  out = preprocess.train_crop(data, np.random.default_rng(3), size=size, scale=scale,
                              flip=False, channels=3, name="p.jpg")
  assert reductions() == [reduction]
  # The reference: the full-resolution decode averaged over reduction x reduction blocks
  # (what the scaled DCT approximates), the box at that scale, resampled bilinearly.
  reduced = np.asarray(full.reduce(reduction))
  t, l, b, r = (round(v / reduction) for v in (top, left, top + h, left + w))
  difference = np.abs(out - bilinear(reduced[t:b, l:r], size, size))
  if reduction == 1:  # The same samples: OpenCV's fixed-point weights against float64.
    assert difference.max() <= 1  # Measured: 0.75.
  else:
    assert difference.mean() < 0.6 and difference.max() <= 3  # Measured: < 0.42 and 2.15.


def test_eval_reduced_decode_matches_full_decode(photo_jpeg, reductions):
  data, full = photo_jpeg
  out = preprocess.eval_crop(data, size=64, crop_fraction=0.875, channels=3, name="p.jpg")
  # Shorter side 750 -> round(64 / 0.875) = 73: a 657-pixel box, still 82 at 1/8.
  assert reductions() == [8]
  ref = np.asarray(full.resize((97, 73), AREA))[4:68, 16:80]
  difference = np.abs(out.astype(int) - ref)
  assert difference.mean() < 1 and difference.max() <= 6


# --- Eval crop -----------------------------------------------------------------------------


def test_eval_crop_is_resize_shorter_side_then_central_crop():
  photo = smooth_photo(375, 500)
  out = preprocess.eval_crop(encode(photo), size=224, crop_fraction=0.875, channels=3,
                             name="e.png")
  # 375 -> 256 = round(224 / 0.875), 500 -> 341; the central 224: rows 16.., columns 58...
  ref = np.asarray(Image.fromarray(photo).resize((341, 256), AREA))[16:240, 58:282]
  np.testing.assert_allclose(out, ref, atol=1)  # The same resampling, up to rounding.

  # A red block at the centre, a black strip at the left edge that the crop cuts off.
  marked = np.full((375, 500, 3), 255, np.uint8)
  marked[137:237, 200:300] = (255, 0, 0)
  marked[:, :60] = 0
  out = preprocess.eval_crop(encode(marked), size=224, crop_fraction=0.875, channels=3,
                             name="e.png")
  np.testing.assert_array_equal(out[112, 112], (255, 0, 0))
  np.testing.assert_array_equal(out[[0, 0, -1, -1], [0, -1, 0, -1]], 255)
  assert (out[:, 0] == 255).all()  # 60 of 500 columns are 41 of 341, less than the 58 cut.


# --- Flip ----------------------------------------------------------------------------------


def test_flip_about_half_the_time():
  half_white = np.zeros((32, 32, 1), np.uint8)
  half_white[:, 16:] = 255
  data = encode(half_white)

  def flipped(rng, flip):
    out = preprocess.train_crop(data, rng, size=8, scale=(1, 1), flip=flip, channels=1,
                                name="f.png")
    return out[:, 0].mean() > out[:, -1].mean()
  rng = np.random.default_rng(0)
  assert 70 <= sum(flipped(rng, True) for _ in range(200)) <= 130
  assert not any(flipped(rng, False) for _ in range(20))


# --- Writing into a batch -------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_crops_written_into_out_equal_the_returned_crops(channels):
  data = encode(smooth_photo(120, 90), "JPEG")
  batch = np.zeros((3, 24, 24, channels), np.uint8)
  for seed in (0, 1):  # Seed 1 flips, seed 0 does not: both paths write into the row.
    crop = preprocess.train_crop(data, np.random.default_rng(seed), size=24, scale=(0.3, 1),
                                 flip=True, channels=channels, name="p.jpg")
    written = preprocess.train_crop(data, np.random.default_rng(seed), size=24,
                                    scale=(0.3, 1), flip=True, channels=channels,
                                    name="p.jpg", out=batch[seed])
    assert np.shares_memory(written, batch[seed])  # The row itself is returned.
    np.testing.assert_array_equal(batch[seed], crop)
  preprocess.eval_crop(data, size=24, crop_fraction=0.875, channels=channels, name="p.jpg",
                       out=batch[2])
  np.testing.assert_array_equal(batch[2], preprocess.eval_crop(
      data, size=24, crop_fraction=0.875, channels=channels, name="p.jpg"))
  assert [_is_flipped(seed) for seed in (0, 1)] == [False, True]


def _is_flipped(seed: int) -> bool:
  """Whether the flip draw of train_crop (after the 22 of the box) flips with this seed."""
  rng = np.random.default_rng(seed)
  rng.random(22)
  return bool(rng.random() < 0.5)


def test_out_of_the_wrong_shape_is_refused():
  data = encode(smooth_photo(40, 40))
  with pytest.raises(ValueError, match=re.escape(
      "out must be a C-contiguous uint8 array of shape (16, 16, 3), not uint8 (16, 16, 1).")):
    preprocess.eval_crop(data, size=16, crop_fraction=1.0, channels=3, name="p.png",
                         out=np.zeros((16, 16, 1), np.uint8))


# --- Bad data ------------------------------------------------------------------------------


def _truncated(fmt: str) -> bytes:
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  data = encode(noise, fmt)
  return data[:len(data) // 2]


@pytest.mark.parametrize("data", [
    b"this is not an image", b"", _truncated("JPEG"), _truncated("PNG")],
    ids=["garbage", "empty", "truncated_jpeg", "truncated_png"])
def test_unreadable_image_raises_data_error_naming_it(data):
  name = "imagenet2012:train[7]"
  pattern = rf"Cannot read image {re.escape(name)}: [^\n]+\. Replace or remove the file\."
  calls = [lambda: preprocess.train_crop(data, np.random.default_rng(0), size=16,
                                         scale=(0.08, 1), flip=True, channels=3, name=name),
           lambda: preprocess.eval_crop(data, size=16, crop_fraction=0.875, channels=1,
                                        name=name)]
  if data.startswith(b"this") or not data:  # A truncated file's header is whole.
    calls.append(lambda: preprocess.image_size_of(data, name=name))
  for call in calls:
    with pytest.raises(errors.DataError) as info:
      call()
    assert re.fullmatch(pattern, str(info.value)), str(info.value)


# --- Imports -------------------------------------------------------------------------------


def test_imports_neither_jax_nor_tensorflow():
  # The module runs in grain worker processes. vit_jax/data/__init__.py (the input pipeline)
  # imports jax itself, so it is stubbed: what is checked is what preprocess and decode pull in.
  code = (
      "import sys, types, vit_jax\n"
      "package = types.ModuleType('vit_jax.data')\n"
      f"package.__path__ = [{str(REPO / 'vit_jax' / 'data')!r}]\n"
      "sys.modules['vit_jax.data'] = package\n"
      "import vit_jax.data.preprocess\n"
      "print(sorted({m.split('.')[0] for m in sys.modules} & "
      "{'jax', 'jaxlib', 'flax', 'tensorflow', 'tensorflow_datasets'}))\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
  assert result.stdout.strip() == "[]"
