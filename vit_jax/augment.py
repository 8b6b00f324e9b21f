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

# Published ImageNet statistics, scaled to 0..255 pixel units.
_IMAGENET_MEAN_C = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD_C = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Keras Normalization divides by max(std, epsilon): a constant channel must not give inf.
_STD_EPSILON = 1e-7
# Inception crop aspect ratios (width / height), as in torchvision and timm.
_INCEPTION_RATIO = (3 / 4, 4 / 3)
# Box proposals tried per image by the inception crop and random erasing before giving up.
_ATTEMPTS = 10
# Random erasing (timm defaults): area fraction and aspect ratio of the rectangle.
_ERASE_AREA = (0.02, 1 / 3)
_ERASE_RATIO = (0.3, 1 / 0.3)
# RandAugment fills pixels that geometric ops bring in from outside with grey (timm).
_RAND_AUGMENT_FILL = 128.0
# The ops of the RandAugment paper (Cubuk et al. 2019) but equalize, chosen uniformly per
# image and layer and always applied (the paper's rule; timm applies each with p=0.5).
# Equalize is left out: its per-pixel table lookup is a gather, and XLA's CPU backend fuses
# it with all the other colour ops into one loop it cannot vectorise, which made
# RandAugment 3x slower.
_RAND_AUGMENT_OPS = ("identity", "autocontrast", "rotate", "solarize", "color", "posterize",
                     "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
                     "translate_y")
_OP = {name: i for i, name in enumerate(_RAND_AUGMENT_OPS)}


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
    x_BxSxSxC = _rand_augment(ra_key, x_BxSxSxC, aug.randaugment_layers,
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


def _lerp(u: jax.Array, low: float, high: float) -> jax.Array:
  """Maps uniform [0, 1) draws to [low, high)."""
  return low + u * (high - low)


def _randint(bits: jax.Array, high: jax.Array | int) -> jax.Array:
  """Maps random uint32 words to integers in [0, high) (bias below high / 2**32).

  Integer remainder also counts as expensive for XLA, so the per-image result is computed
  once rather than fused into, and recomputed by, every per-pixel loop that reads it.
  """
  return (bits % jnp.asarray(high, jnp.uint32)).astype(jnp.int32)


# --- Geometry ---------------------------------------------------------------------------


def warp_affine(images_BxHxWxC: jax.Array, matrix_Bx2x3: jax.Array, out_hw: tuple[int, int],
                *, fill: str | float) -> jax.Array:
  """Bilinear affine resampling: 4 gathered taps per output pixel.

  `matrix_Bx2x3` maps each output pixel (x = column, y = row, 1) to the input position it
  reads, in pixel-centre coordinates (Keras/TF `ImageProjectiveTransform` convention).
  fill: "reflect" mirrors the image about its edges, (d c b a | a b c d | d c b a), as
  Keras's default; a number fills outside with that constant (blended at the border).
  """
  batch, height, width, channels = images_BxHxWxC.shape
  out_h, out_w = out_hw
  cols_1xW = jnp.arange(out_w, dtype=jnp.float32)[None, :]
  rows_Hx1 = jnp.arange(out_h, dtype=jnp.float32)[:, None]
  m_Bx2x3x1x1 = matrix_Bx2x3.astype(jnp.float32)[:, :, :, None, None]
  x_BxHxW = m_Bx2x3x1x1[:, 0, 0] * cols_1xW + m_Bx2x3x1x1[:, 0, 1] * rows_Hx1 + m_Bx2x3x1x1[:, 0, 2]
  y_BxHxW = m_Bx2x3x1x1[:, 1, 0] * cols_1xW + m_Bx2x3x1x1[:, 1, 1] * rows_Hx1 + m_Bx2x3x1x1[:, 1, 2]

  # A one-pixel border lets every tap read the padded image directly: the edge copy is the
  # reflection of index -1 (or n); the constant border is the fill itself.
  border = ((0, 0), (1, 1), (1, 1), (0, 0))
  if fill == "reflect":
    x_BxHxW, y_BxHxW = _reflect(x_BxHxW, width), _reflect(y_BxHxW, height)
    padded_BxHxWxC = jnp.pad(images_BxHxWxC, border, mode="edge")
  else:
    padded_BxHxWxC = jnp.pad(images_BxHxWxC, border, constant_values=fill)
  # Positions beyond the border clamp onto it with weight 1 on the border pixel.
  x0_BxHxW = jnp.clip(jnp.floor(x_BxHxW), -1, width - 1)
  y0_BxHxW = jnp.clip(jnp.floor(y_BxHxW), -1, height - 1)
  fx_BxHxWx1 = jnp.clip(x_BxHxW - x0_BxHxW, 0.0, 1.0)[..., None]
  fy_BxHxWx1 = jnp.clip(y_BxHxW - y0_BxHxW, 0.0, 1.0)[..., None]

  # Flat per-image gathers, vmapped: XLA's CPU gather is cheapest on a 2-D operand, and the
  # batch dimension stays explicit, so a batch-sharded input is gathered shard-locally.
  padded_w = width + 2
  flat_BxNxC = padded_BxHxWxC.reshape(batch, -1, channels)
  top_left_BxHxW = ((y0_BxHxW.astype(jnp.int32) + 1) * padded_w
                    + x0_BxHxW.astype(jnp.int32) + 1)

  def tap(index_BxHxW: jax.Array) -> jax.Array:
    return jax.vmap(lambda flat_NxC, index_HxW: flat_NxC.at[index_HxW].get(
        mode="promise_in_bounds"))(flat_BxNxC, index_BxHxW)

  top_BxHxWxC = tap(top_left_BxHxW) * (1 - fx_BxHxWx1) + tap(top_left_BxHxW + 1) * fx_BxHxWx1
  bottom_BxHxWxC = (tap(top_left_BxHxW + padded_w) * (1 - fx_BxHxWx1)
                    + tap(top_left_BxHxW + padded_w + 1) * fx_BxHxWx1)
  return top_BxHxWxC * (1 - fy_BxHxWx1) + bottom_BxHxWxC * fy_BxHxWx1


def _reflect(coord: jax.Array, size: int) -> jax.Array:
  """Folds coordinates into [-0.5, size - 0.5] by mirroring about the outer pixel edges.

  Sampling bilinearly at the folded position equals reflecting each tap's index.
  """
  period = 2 * size
  shifted = coord + 0.5
  # floor-based modulo: XLA's CPU fmod costs more than the whole gather.
  wrapped = shifted - period * jnp.floor(shifted / period)
  return jnp.where(wrapped < size, wrapped, period - wrapped) - 0.5


def rotation_zoom_matrix(angle_B: jax.Array, zoom_y_B: jax.Array, zoom_x_B: jax.Array,
                         height: int, width: int) -> jax.Array:
  """Keras RandomRotation followed by RandomZoom, as one output -> input matrix (B x 2 x 3).

  angle in radians, positive = counter-clockwise on screen; zoom > 1 shows more of the
  image (zoom out). Both are about the centre ((width - 1) / 2, (height - 1) / 2), like
  Keras's `_compute_affine_matrix` and `_get_zoom_matrix`. Keras zooms the rotated image, so
  an output pixel p reads the input at R(Z(p)).
  """
  cx, cy = (width - 1) / 2, (height - 1) / 2
  cos_B, sin_B = jnp.cos(angle_B), jnp.sin(angle_B)
  a_Bx2x2 = jnp.stack([jnp.stack([cos_B * zoom_x_B, -sin_B * zoom_y_B], -1),
                       jnp.stack([sin_B * zoom_x_B, cos_B * zoom_y_B], -1)], -2)
  return _about_center(a_Bx2x2, cx, cy)


def _about_center(a_Bx2x2: jax.Array, cx: float, cy: float) -> jax.Array:
  """Affine matrix applying the linear map `a` about (cx, cy): p -> a (p - c) + c."""
  center_2 = jnp.array([cx, cy], jnp.float32)
  offset_Bx2 = center_2 - jnp.einsum("bij,j->bi", a_Bx2x2, center_2)
  return jnp.concatenate([a_Bx2x2, offset_Bx2[:, :, None]], axis=-1)


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
  matrix_Bx2x3 = rotation_zoom_matrix(angle_B, zoom_y_B, zoom_x_B, height, width)
  return warp_affine(x_BxSxSxC, matrix_Bx2x3, (height, width), fill="reflect")


def _resize(x_BxHxWxC: jax.Array, image_size: int) -> jax.Array:
  """Bilinear resize (antialiased when shrinking); a no-op at the target size."""
  batch, height, width, channels = x_BxHxWxC.shape
  if (height, width) == (image_size, image_size):
    return x_BxHxWxC
  return jax.image.resize(x_BxHxWxC, (batch, image_size, image_size, channels), "bilinear")


def _random_flip(key: jax.Array, x_BxHxWxC: jax.Array) -> jax.Array:
  """Horizontal flip of each image with probability 1/2."""
  bits_B = jax.random.bits(key, (x_BxHxWxC.shape[0],), jnp.uint32)
  flip_Bx1x1x1 = (_randint(bits_B, 2) == 1)[:, None, None, None]
  return jnp.where(flip_Bx1x1x1, x_BxHxWxC[:, :, ::-1], x_BxHxWxC)


def _pad_crop(key: jax.Array, x_BxHxWxC: jax.Array, padding: int) -> jax.Array:
  """Zero-pads by `padding` and takes a random H x W window per image (CIFAR standard)."""
  batch, height, width, channels = x_BxHxWxC.shape
  offsets_Bx2 = _randint(jax.random.bits(key, (batch, 2), jnp.uint32), 2 * padding + 1)
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
  area_BxA = _lerp(u_BxU[:, :_ATTEMPTS], *scale) * height * width
  log_ratio = (math.log(_INCEPTION_RATIO[0]), math.log(_INCEPTION_RATIO[1]))
  ratio_BxA = jnp.exp(_lerp(u_BxU[:, _ATTEMPTS:2 * _ATTEMPTS], *log_ratio))
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
  return warp_affine(x_BxHxWxC, matrix_Bx2x3, (image_size, image_size), fill="reflect")


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
    mean_C, std_C = jnp.array(_IMAGENET_MEAN_C), jnp.array(_IMAGENET_STD_C)
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
  area_BxA = _lerp(u_BxU[:, :_ATTEMPTS], *_ERASE_AREA) * height * width
  ratio_BxA = jnp.exp(_lerp(u_BxU[:, _ATTEMPTS:2 * _ATTEMPTS], math.log(_ERASE_RATIO[0]),
                            math.log(_ERASE_RATIO[1])))
  box_h_BxA = jnp.round(jnp.sqrt(area_BxA * ratio_BxA)).astype(jnp.int32)
  box_w_BxA = jnp.round(jnp.sqrt(area_BxA / ratio_BxA)).astype(jnp.int32)
  # timm keeps the first proposal strictly smaller than the image; none means no erasing.
  fits_BxA = (box_h_BxA < height) & (box_w_BxA < width)
  first_Bx1 = jnp.argmax(fits_BxA, axis=1)[:, None]
  apply_B = (u_BxU[:, -1] < prob) & fits_BxA.any(axis=1)
  box_h_B = jnp.take_along_axis(box_h_BxA, first_Bx1, 1)[:, 0]
  box_w_B = jnp.take_along_axis(box_w_BxA, first_Bx1, 1)[:, 0]
  corner_bits_Bx2 = jax.random.bits(corner_key, (batch, 2), jnp.uint32)
  top_B = _randint(corner_bits_Bx2[:, 0], height - box_h_B + 1)
  left_B = _randint(corner_bits_Bx2[:, 1], width - box_w_B + 1)

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
  ops per value, where jax.random.normal's erf_inv costs about 10 ns per value on CPU
  (XLA duplicates it into each consumer, e.g. both sides of mixup).
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
    cy, cx = _randint(center_bits_2[0], height), _randint(center_bits_2[1], width)
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


# --- RandAugment -------------------------------------------------------------------------


def _rand_augment(key: jax.Array, x_BxSxSxC: jax.Array, num_layers: int,
                  magnitude: float) -> jax.Array:
  """RandAugment(N, M) on 0..255 float images; every op clips back to 0..255.

  Each layer picks one of `_RAND_AUGMENT_OPS` per image. Magnitudes follow timm's
  "increasing" variants at level M (of 10), signs random per image:
    rotate +-30 deg * M/10, shear +-0.3 * M/10 (about the centre), translate +-0.45 * M/10
    of the size; color/contrast/brightness/sharpness factor 1 +- 0.9 * M/10;
    solarize threshold 256 * (1 - M/10); posterize keeps 8 - floor(4 M/10) bits
    (the AutoAugment 4..8 range, stronger with M); autocontrast (PIL ImageOps) and
    identity take no magnitude.
  Geometric ops share one warp per layer (identity matrices for the other images, which
  read pixels exactly) and colour ops are elementwise, so a layer costs one gather plus a
  few fused passes, however many ops the batch chose.
  """
  batch, height, width, _ = x_BxSxSxC.shape
  level = magnitude / 10
  for bits_Bx2 in jax.random.bits(key, (num_layers, batch, 2), jnp.uint32):
    op_B = _randint(bits_Bx2[:, 0], len(_RAND_AUGMENT_OPS))
    sign_B = jnp.where(_randint(bits_Bx2[:, 1], 2) == 0, 1.0, -1.0)
    matrix_Bx2x3 = _rand_augment_matrix(op_B, sign_B * level, height, width)
    x_BxSxSxC = warp_affine(x_BxSxSxC, matrix_Bx2x3, (height, width), fill=_RAND_AUGMENT_FILL)
    x_BxSxSxC = _rand_augment_color(x_BxSxSxC, op_B, sign_B * level, level)
  return x_BxSxSxC


def _rand_augment_matrix(op_B: jax.Array, signed_level_B: jax.Array, height: int,
                         width: int) -> jax.Array:
  """Output -> input matrices of the geometric ops; the identity for all other ops."""
  one_B, zero_B = jnp.ones_like(signed_level_B), jnp.zeros_like(signed_level_B)
  angle_B = jnp.deg2rad(30.0) * signed_level_B
  shear_B = 0.3 * signed_level_B
  cos_B, sin_B = jnp.cos(angle_B), jnp.sin(angle_B)

  def linear(a, b, c, d):
    return jnp.stack([jnp.stack([a, b], -1), jnp.stack([c, d], -1)], -2)

  identity = linear(one_B, zero_B, zero_B, one_B)
  a_Bx2x2 = jnp.select(
      [op_B[:, None, None] == _OP["rotate"], op_B[:, None, None] == _OP["shear_x"],
       op_B[:, None, None] == _OP["shear_y"]],
      [linear(cos_B, -sin_B, sin_B, cos_B), linear(one_B, shear_B, zero_B, one_B),
       linear(one_B, zero_B, shear_B, one_B)], identity)
  matrix_Bx2x3 = _about_center(a_Bx2x2, (width - 1) / 2, (height - 1) / 2)
  shift_x_B = jnp.where(op_B == _OP["translate_x"], 0.45 * signed_level_B * width, 0.0)
  shift_y_B = jnp.where(op_B == _OP["translate_y"], 0.45 * signed_level_B * height, 0.0)
  return matrix_Bx2x3.at[:, :, 2].add(jnp.stack([shift_x_B, shift_y_B], -1))


def _rand_augment_color(x_BxSxSxC: jax.Array, op_B: jax.Array, signed_level_B: jax.Array,
                        level: float) -> jax.Array:
  """The colour ops chosen in `op_B`, one per image.

  All but solarize and posterize are affine in the pixels, so instead of computing every
  op for every image and selecting, each image gets coefficients of
    y = alpha * x + beta * grey + gamma * smooth + delta
  (PIL ImageEnhance blends x with a "degenerate" image by factor f: grey for color, the
  grey mean for contrast, black for brightness, PIL's SMOOTH filter for sharpness;
  autocontrast rescales each channel's min..max to 0..255; identity and the geometric ops
  keep alpha = 1). Solarize and posterize then apply where chosen.
  """
  def is_op(*names: str) -> jax.Array:
    return jnp.isin(op_B, jnp.array([_OP[name] for name in names]))[:, None, None, None]

  gray_BxSxSx1 = _grayscale(x_BxSxSxC)
  f_Bx1x1x1 = (1.0 + 0.9 * signed_level_B)[:, None, None, None]
  low_Bx1x1xC = x_BxSxSxC.min((1, 2), keepdims=True)
  span_Bx1x1xC = x_BxSxSxC.max((1, 2), keepdims=True) - low_Bx1x1xC
  # PIL leaves images with a constant channel as they are.
  stretch_Bx1x1xC = jnp.where(span_Bx1x1xC > 0, 255 / jnp.maximum(span_Bx1x1xC, 1), 1.0)

  autocontrast = is_op("autocontrast")
  alpha_Bx1x1xC = jnp.where(is_op("color", "contrast", "brightness", "sharpness"), f_Bx1x1x1,
                            jnp.where(autocontrast, stretch_Bx1x1xC, 1.0))
  beta_Bx1x1x1 = jnp.where(is_op("color"), 1 - f_Bx1x1x1, 0.0)
  gamma_Bx1x1x1 = jnp.where(is_op("sharpness"), 1 - f_Bx1x1x1, 0.0)
  delta_Bx1x1xC = jnp.where(
      is_op("contrast"), (1 - f_Bx1x1x1) * gray_BxSxSx1.mean((1, 2, 3), keepdims=True),
      jnp.where(autocontrast, -low_Bx1x1xC * stretch_Bx1x1xC, 0.0))
  y_BxSxSxC = (alpha_Bx1x1xC * x_BxSxSxC + beta_Bx1x1x1 * gray_BxSxSx1
               + gamma_Bx1x1x1 * _smooth(x_BxSxSxC) + delta_Bx1x1xC)

  y_BxSxSxC = jnp.where(is_op("solarize") & (y_BxSxSxC >= 256 * (1 - level)),
                        255 - y_BxSxSxC, y_BxSxSxC)
  step = 2.0 ** math.floor(4 * level)
  y_BxSxSxC = jnp.where(is_op("posterize"), jnp.floor(y_BxSxSxC / step) * step, y_BxSxSxC)
  return jnp.clip(y_BxSxSxC, 0.0, 255.0)


def _grayscale(x_BxSxSxC: jax.Array) -> jax.Array:
  """PIL's "L" conversion (ITU-R 601-2 luma); single-channel images are their own grey."""
  if x_BxSxSxC.shape[-1] == 1:
    return x_BxSxSxC
  return (0.299 * x_BxSxSxC[..., 0:1] + 0.587 * x_BxSxSxC[..., 1:2]
          + 0.114 * x_BxSxSxC[..., 2:3])


def _smooth(x_BxSxSxC: jax.Array) -> jax.Array:
  """PIL's SMOOTH filter (3x3, centre weight 5, total 13) that ImageEnhance.Sharpness blends
  against; like PIL it leaves the one-pixel border unfiltered.

  Computed as a separable 3x3 box sum plus 4x the centre: 4 adds per pixel, not 9.
  """
  height, width = x_BxSxSxC.shape[1:3]
  rows_sum = x_BxSxSxC[:, :-2] + x_BxSxSxC[:, 1:-1] + x_BxSxSxC[:, 2:]
  box_sum = rows_sum[:, :, :-2] + rows_sum[:, :, 1:-1] + rows_sum[:, :, 2:]
  inner = (box_sum + 4 * x_BxSxSxC[:, 1:-1, 1:-1]) / 13
  border_SxS = jnp.pad(jnp.zeros((height - 2, width - 2), bool), 1, constant_values=True)
  return jnp.where(border_SxS[None, :, :, None], x_BxSxSxC,
                   jnp.pad(inner, ((0, 0), (1, 1), (1, 1), (0, 0))))
