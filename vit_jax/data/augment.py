"""Batched image augmentation in pure JAX, run on the device inside the jitted train step.

Every function here is shape-static and jittable, and the randomness comes only from the
`rng` argument: the same key gives bit-identical batches, which is what makes a resumed run
repeat the batches of the run it continues. The config (`config.aug`) holds plain Python
values, so disabled ops are left out of the traced program rather than skipped at run time.

Train order (each op only when enabled):
  uint8 -> float -> crop ("pad_crop" | "inception") -> flip -> resize to image_size
  -> rotate+zoom (one affine warp) -> RandAugment -> normalise -> random erasing
  -> mixup/cutmix.
The Keras origin runs Normalization -> Resizing -> RandomFlip -> RandomRotation ->
RandomZoom. This is the same map up to float rounding: bilinear resampling with reflect fill
makes every output pixel a convex combination of input pixels, so a per-channel affine
normalisation commutes with it, and the (mirror-symmetric) resize commutes with the flip.
Normalising last lets RandAugment see the 0..255 pixels its ops are defined on; flipping
before an upsizing resize moves fewer pixels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from vit_jax.data import geometry, randaugment

# Published ImageNet statistics, scaled to 0..255 pixel units.
IMAGENET_MEAN_C = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_C = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Keras Normalization divides by max(std, epsilon): a constant channel must not give inf.
_STD_EPSILON = 1e-7
# Inception crop aspect ratios (width / height), as in torchvision and timm.
_INCEPTION_RATIO = (3 / 4, 4 / 3)
# Box proposals tried per image by the inception crop and random erasing before giving up.
_ATTEMPTS = 10
# Random erasing (timm defaults): area fraction and aspect ratio of the rectangle.
_ERASE_AREA = (0.02, 1 / 3)
_ERASE_RATIO = (0.3, 1 / 0.3)


def train_preprocess(rng: jax.Array, images_BxHxWxC: jax.Array, labels_B: jax.Array,
                     aug: ml_collections.ConfigDict, *, image_size: int, num_classes: int,
                     label_smoothing: float, mean_C: jax.Array | None,
                     std_C: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Augments a uint8 batch: float32 B x S x S x C normalised images, B x K soft targets.

  Targets are label-smoothed one-hots (true class 1 - ls + ls/K, others ls/K), mixed
  like the images when mixup/cutmix fire. `mean_C`/`std_C` (0..255 units) are used only
  by `aug.normalize == "dataset"`.
  """
  # One key per op, split the same way whatever is enabled: turning an op on or off leaves
  # the randomness of the others unchanged. Each op then draws all it needs at once (one
  # uniform and/or one bits call): every jax.random call is a threefry loop that costs
  # compile and run time.
  crop_key, flip_key, warp_key, ra_key, erase_key, mix_key = jax.random.split(rng, 6)
  x_BxHxWxC = images_BxHxWxC.astype(jnp.float32)

  if aug.crop == "pad_crop":
    x_BxHxWxC = _pad_crop(crop_key, x_BxHxWxC, aug.crop_padding)
  elif aug.crop == "inception":
    x_BxHxWxC = _inception_crop(crop_key, x_BxHxWxC, image_size, tuple(aug.crop_scale))
  elif aug.crop != "none":
    raise ValueError(f"Unknown aug.crop {aug.crop!r}: use 'none', 'pad_crop' or 'inception'.")
  if aug.flip:
    x_BxHxWxC = _random_flip(flip_key, x_BxHxWxC)
  x_BxSxSxC = _resize(x_BxHxWxC, image_size)
  if aug.rotate or aug.zoom:
    x_BxSxSxC = _random_rotate_zoom(warp_key, x_BxSxSxC, aug.rotate, aug.zoom)
  if aug.randaugment_layers:
    x_BxSxSxC = randaugment.rand_augment(ra_key, x_BxSxSxC, aug.randaugment_layers,
                              aug.randaugment_magnitude)
  x_BxSxSxC = _normalize(x_BxSxSxC, aug.normalize, mean_C, std_C)
  if aug.random_erasing:
    x_BxSxSxC = _random_erasing(erase_key, x_BxSxSxC, aug.random_erasing)

  targets_BxK = _smooth_one_hot(labels_B, num_classes, label_smoothing)
  if aug.mixup_alpha or aug.cutmix_alpha:
    x_BxSxSxC, targets_BxK = _mixup_cutmix(mix_key, x_BxSxSxC, targets_BxK, aug)
  return x_BxSxSxC, targets_BxK


def eval_preprocess(images_BxHxWxC: jax.Array, aug: ml_collections.ConfigDict, *,
                    image_size: int, mean_C: jax.Array | None,
                    std_C: jax.Array | None) -> jax.Array:
  """Deterministic counterpart of `train_preprocess`: float32 B x S x S x C images.

  Keeps the central `aug.eval_crop_fraction` of each side (1.0: the whole image), resizes
  to image_size and normalises.
  """
  x_BxHxWxC = images_BxHxWxC.astype(jnp.float32)
  if aug.eval_crop_fraction < 1.0:
    _, height, width, _ = x_BxHxWxC.shape
    crop_h = max(1, round(height * aug.eval_crop_fraction))
    crop_w = max(1, round(width * aug.eval_crop_fraction))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    x_BxHxWxC = x_BxHxWxC[:, top:top + crop_h, left:left + crop_w]
  return _normalize(_resize(x_BxHxWxC, image_size), aug.normalize, mean_C, std_C)


def _smooth_one_hot(labels_B: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """One-hot targets with label smoothing: onehot * (1 - ls) + ls / K."""
  one_hot_BxK = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32)
  return one_hot_BxK * (1.0 - label_smoothing) + label_smoothing / num_classes


# --- Geometry ---------------------------------------------------------------------------


def _random_rotate_zoom(key: jax.Array, x_BxSxSxC: jax.Array, rotate: float,
                        zoom: float) -> jax.Array:
  """Keras RandomRotation(rotate) + RandomZoom(zoom, zoom) with its reflect fill.

  Keras 3 semantics (keras/src/layers/preprocessing/image_preprocessing):
  - rotation angle ~ U(-rotate, rotate) * 360 degrees per image;
  - RandomZoom(height_factor=z, width_factor=z) draws height and width zoom independently,
    each ~ U(1 - z, 1 + z), the factor scaling the sampled region: > 1 zooms out.
  Keras warps twice (map_coordinates per layer); one composed warp is a single gather.
  """
  batch, height, width, _ = x_BxSxSxC.shape
  u_Bx3 = jax.random.uniform(key, (batch, 3), minval=-1.0, maxval=1.0)
  angle_B = u_Bx3[:, 0] * rotate * 2 * math.pi
  zoom_y_B, zoom_x_B = 1 + u_Bx3[:, 1] * zoom, 1 + u_Bx3[:, 2] * zoom
  matrix_Bx2x3 = geometry.rotation_zoom_matrix(angle_B, zoom_y_B, zoom_x_B, height, width)
  return geometry.warp_affine(x_BxSxSxC, matrix_Bx2x3, (height, width), fill="reflect")


def _resize(x_BxHxWxC: jax.Array, image_size: int) -> jax.Array:
  """Bilinear resize (antialiased when shrinking); a no-op at the target size."""
  batch, height, width, channels = x_BxHxWxC.shape
  if (height, width) == (image_size, image_size):
    return x_BxHxWxC
  return jax.image.resize(x_BxHxWxC, (batch, image_size, image_size, channels), "bilinear")


def _random_flip(key: jax.Array, x_BxHxWxC: jax.Array) -> jax.Array:
  """Horizontal flip of each image with probability 1/2."""
  bits_B = jax.random.bits(key, (x_BxHxWxC.shape[0],), jnp.uint32)
  flip_Bx1x1x1 = (geometry.randint(bits_B, 2) == 1)[:, None, None, None]
  return jnp.where(flip_Bx1x1x1, x_BxHxWxC[:, :, ::-1], x_BxHxWxC)


def _pad_crop(key: jax.Array, x_BxHxWxC: jax.Array, padding: int) -> jax.Array:
  """Zero-pads by `padding` and takes a random H x W window per image (CIFAR standard)."""
  batch, height, width, channels = x_BxHxWxC.shape
  offsets_Bx2 = geometry.randint(jax.random.bits(key, (batch, 2), jnp.uint32), 2 * padding + 1)
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def crop(image_HxWxC: jax.Array, offset_2: jax.Array) -> jax.Array:
    return lax.dynamic_slice(image_HxWxC, (offset_2[0], offset_2[1], 0), (height, width, channels))

  return jax.vmap(crop)(padded, offsets_Bx2)


def _inception_crop(key: jax.Array, x_BxHxWxC: jax.Array, image_size: int,
                    scale: tuple[float, float]) -> jax.Array:
  """Random-resized crop: a box of area fraction ~ U(scale) and aspect ratio log-uniform in
  [3/4, 4/3], bilinearly resampled to image_size (no antialiasing when shrinking).

  Like torchvision, up to `_ATTEMPTS` proposals are drawn and the first that fits is used;
  if none fits, the whole image. Boxes are continuous rather than rounded to pixels.
  """
  batch, height, width, _ = x_BxHxWxC.shape
  u_BxU = jax.random.uniform(key, (batch, 2 * _ATTEMPTS + 2))
  area_BxA = geometry.lerp(u_BxU[:, :_ATTEMPTS], *scale) * height * width
  log_ratio = (math.log(_INCEPTION_RATIO[0]), math.log(_INCEPTION_RATIO[1]))
  ratio_BxA = jnp.exp(geometry.lerp(u_BxU[:, _ATTEMPTS:2 * _ATTEMPTS], *log_ratio))
  box_w_BxA = jnp.sqrt(area_BxA * ratio_BxA)
  box_h_BxA = jnp.sqrt(area_BxA / ratio_BxA)
  fits_BxA = (box_w_BxA <= width) & (box_h_BxA <= height)
  first_Bx1 = jnp.argmax(fits_BxA, axis=1)[:, None]
  any_fits_B = fits_BxA.any(axis=1)
  box_w_B = jnp.where(any_fits_B, jnp.take_along_axis(box_w_BxA, first_Bx1, 1)[:, 0], width)
  box_h_B = jnp.where(any_fits_B, jnp.take_along_axis(box_h_BxA, first_Bx1, 1)[:, 0], height)
  top_B = u_BxU[:, -2] * (height - box_h_B)
  left_B = u_BxU[:, -1] * (width - box_w_B)

  # Output pixel centre (i + 0.5) / S of the box, in input pixel-centre coordinates.
  scale_x_B, scale_y_B = box_w_B / image_size, box_h_B / image_size
  zeros_B = jnp.zeros_like(scale_x_B)
  matrix_Bx2x3 = jnp.stack([
      jnp.stack([scale_x_B, zeros_B, left_B + 0.5 * scale_x_B - 0.5], -1),
      jnp.stack([zeros_B, scale_y_B, top_B + 0.5 * scale_y_B - 0.5], -1)], -2)
  return geometry.warp_affine(x_BxHxWxC, matrix_Bx2x3, (image_size, image_size), fill="reflect")


# --- Pixel values ------------------------------------------------------------------------


def _normalize(x_BxSxSxC: jax.Array, mode: str, mean_C: jax.Array | None,
               std_C: jax.Array | None) -> jax.Array:
  """Maps 0..255 pixels to the model's input range."""
  if mode == "minus_one_one":
    # Centred first: XLA turns the division into a multiply by a rounded reciprocal, and
    # x / 127.5 - 1 would then give 1.0000001 for 255.
    return (x_BxSxSxC - 127.5) / 127.5
  if mode == "imagenet":
    if x_BxSxSxC.shape[-1] != 3:
      raise ValueError("aug.normalize='imagenet' needs RGB images; use 'dataset' or "
                       "'minus_one_one' for single-channel data.")
    mean_C, std_C = jnp.array(IMAGENET_MEAN_C), jnp.array(IMAGENET_STD_C)
  elif mode == "dataset":
    if mean_C is None or std_C is None:
      raise ValueError("aug.normalize='dataset' needs the training set's mean_C and std_C.")
  else:
    raise ValueError(f"Unknown aug.normalize {mode!r}: use 'dataset', 'minus_one_one' or "
                     "'imagenet'.")
  mean_C = jnp.asarray(mean_C, jnp.float32)
  std_C = jnp.maximum(jnp.asarray(std_C, jnp.float32), _STD_EPSILON)
  return (x_BxSxSxC - mean_C) / std_C


def _random_erasing(key: jax.Array, x_BxSxSxC: jax.Array, prob: float) -> jax.Array:
  """timm RandomErasing (mode "pixel", one rectangle): with probability `prob` per image, a
  rectangle of area fraction ~ U(0.02, 1/3) and log-uniform aspect in [0.3, 3.3] is
  replaced by zero-mean unit-variance noise (`_unit_noise`) in normalised space.
  """
  batch, height, width, _ = x_BxSxSxC.shape
  box_key, corner_key, noise_key = jax.random.split(key, 3)
  u_BxU = jax.random.uniform(box_key, (batch, 2 * _ATTEMPTS + 1))
  area_BxA = geometry.lerp(u_BxU[:, :_ATTEMPTS], *_ERASE_AREA) * height * width
  ratio_BxA = jnp.exp(geometry.lerp(u_BxU[:, _ATTEMPTS:2 * _ATTEMPTS],
                                    math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])))
  box_h_BxA = jnp.round(jnp.sqrt(area_BxA * ratio_BxA)).astype(jnp.int32)
  box_w_BxA = jnp.round(jnp.sqrt(area_BxA / ratio_BxA)).astype(jnp.int32)
  # timm keeps the first proposal strictly smaller than the image; none means no erasing.
  fits_BxA = (box_h_BxA < height) & (box_w_BxA < width)
  first_Bx1 = jnp.argmax(fits_BxA, axis=1)[:, None]
  apply_B = (u_BxU[:, -1] < prob) & fits_BxA.any(axis=1)
  box_h_B = jnp.take_along_axis(box_h_BxA, first_Bx1, 1)[:, 0]
  box_w_B = jnp.take_along_axis(box_w_BxA, first_Bx1, 1)[:, 0]
  corner_bits_Bx2 = jax.random.bits(corner_key, (batch, 2), jnp.uint32)
  top_B = geometry.randint(corner_bits_Bx2[:, 0], height - box_h_B + 1)
  left_B = geometry.randint(corner_bits_Bx2[:, 1], width - box_w_B + 1)

  rows_1xSx1 = jnp.arange(height)[None, :, None]
  cols_1x1xS = jnp.arange(width)[None, None, :]
  inside_BxSxS = ((rows_1xSx1 >= top_B[:, None, None])
                  & (rows_1xSx1 < (top_B + box_h_B)[:, None, None])
                  & (cols_1x1xS >= left_B[:, None, None])
                  & (cols_1x1xS < (left_B + box_w_B)[:, None, None]) & apply_B[:, None, None])
  noise_BxSxSxC = _unit_noise(noise_key, x_BxSxSxC.shape)
  return jnp.where(inside_BxSxS[..., None], noise_BxSxSxC, x_BxSxSxC)


def _unit_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Noise of mean 0 and variance 1: the standardised sum of the 4 bytes of a random word.

  This Irwin-Hall(4) law is close to N(0, 1) (bounded by +-3.45) and costs a few integer
  ops per value, where jax.random.normal's erf_inv is costly on CPU and XLA duplicates it
  into each consumer, e.g. both sides of mixup (docs/performance.md).
  """
  word = jax.random.bits(key, shape, jnp.uint32)
  byte_sum = (word & 0xFF) + ((word >> 8) & 0xFF) + ((word >> 16) & 0xFF) + (word >> 24)
  byte_std = math.sqrt(4 * (256**2 - 1) / 12)
  return (byte_sum.astype(jnp.float32) - 4 * 127.5) / byte_std


# --- Batch mixing ------------------------------------------------------------------------


def _mixup_cutmix(key: jax.Array, x_BxSxSxC: jax.Array, targets_BxK: jax.Array,
                  aug: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """timm Mixup in "batch" mode: one lambda per batch, each image mixed with x[::-1].

  With probability mix_prob the batch is mixed; with both alphas set, cutmix is chosen with
  probability mix_switch_prob. lam ~ Beta(alpha, alpha) of the chosen op. Mixup:
  x = lam x + (1 - lam) x_flip. Cutmix pastes a box of x_flip with sides
  sqrt(1 - lam) * S (clipped at the border) and sets lam to the unpasted area fraction.
  Targets mix with the same lam.
  """
  batch, height, width, _ = x_BxSxSxC.shape
  uniform_key, center_key, beta_key = jax.random.split(key, 3)
  u_2 = jax.random.uniform(uniform_key, (2,))
  mix = u_2[0] < aug.mix_prob
  if aug.mixup_alpha and aug.cutmix_alpha:
    use_cutmix = u_2[1] < aug.mix_switch_prob
  else:
    use_cutmix = jnp.asarray(bool(aug.cutmix_alpha))
  # One Beta draw whatever the op: each jax.random.beta adds seconds of compile time.
  alpha = jnp.where(use_cutmix, aug.cutmix_alpha, aug.mixup_alpha)
  lam = jnp.where(mix, jax.random.beta(beta_key, alpha, alpha), 1.0)
  # The op not chosen gets lam = 1, which leaves images and targets exactly unchanged.
  lam_mixup = jnp.where(use_cutmix, 1.0, lam)
  x_flip_BxSxSxC = x_BxSxSxC[::-1]
  mixed_BxSxSxC = x_BxSxSxC * lam_mixup + x_flip_BxSxSxC * (1 - lam_mixup)

  if aug.cutmix_alpha:
    cut_rat = jnp.sqrt(1.0 - jnp.where(use_cutmix, lam, 1.0))
    cut_h = jnp.floor(height * cut_rat).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_rat).astype(jnp.int32)
    center_bits_2 = jax.random.bits(center_key, (2,), jnp.uint32)
    cy, cx = geometry.randint(center_bits_2[0], height), geometry.randint(center_bits_2[1], width)
    y_lo, y_hi = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x_lo, x_hi = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows_Sx1 = jnp.arange(height)[:, None]
    cols_1xS = jnp.arange(width)[None, :]
    box_SxS = (rows_Sx1 >= y_lo) & (rows_Sx1 < y_hi) & (cols_1xS >= x_lo) & (cols_1xS < x_hi)
    mixed_BxSxSxC = jnp.where(box_SxS[None, :, :, None], x_flip_BxSxSxC, mixed_BxSxSxC)
    box_fraction = ((y_hi - y_lo) * (x_hi - x_lo)).astype(jnp.float32) / (height * width)
    lam = jnp.where(use_cutmix, 1.0 - box_fraction, lam)

  targets_BxK = targets_BxK * lam + targets_BxK[::-1] * (1 - lam)
  return mixed_BxSxSxC, targets_BxK
