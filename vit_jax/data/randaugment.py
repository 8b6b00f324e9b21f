"""RandAugment (Cubuk et al. 2019) on batches of 0..255 float images, in JAX.

Each layer picks one op per image; geometric ops share one warp per layer and colour ops
are per-image coefficients of one affine blend, so a layer costs one gather and a few
fused passes however many ops the batch chose.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vit_jax.data import geometry

# RandAugment fills pixels that geometric ops bring in from outside with grey (timm).
_FILL = 128.0
# The ops of the RandAugment paper (Cubuk et al. 2019) but equalize, chosen uniformly per
# image and layer and always applied (the paper's rule; timm applies each with p=0.5).
# Equalize is left out: its per-pixel table lookup is a gather, and XLA's CPU backend fuses
# it with all the other colour ops into one loop it cannot vectorise (docs/performance.md).
OPS = ("identity", "autocontrast", "rotate", "solarize", "color", "posterize",
                     "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
                     "translate_y")
OP = {name: i for i, name in enumerate(OPS)}


def rand_augment(key: jax.Array, x_BxSxSxC: jax.Array, num_layers: int,
                  magnitude: float) -> jax.Array:
  """RandAugment(N, M) on 0..255 float images; every op clips back to 0..255.

  Each layer picks one of `OPS` per image. Magnitudes follow timm's
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
    op_B = geometry.randint(bits_Bx2[:, 0], len(OPS))
    sign_B = jnp.where(geometry.randint(bits_Bx2[:, 1], 2) == 0, 1.0, -1.0)
    matrix_Bx2x3 = geometric_matrix(op_B, sign_B * level, height, width)
    x_BxSxSxC = geometry.warp_affine(x_BxSxSxC, matrix_Bx2x3, (height, width), fill=_FILL)
    x_BxSxSxC = color_ops(x_BxSxSxC, op_B, sign_B * level, level)
  return x_BxSxSxC


def geometric_matrix(op_B: jax.Array, signed_level_B: jax.Array, height: int,
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
      [op_B[:, None, None] == OP["rotate"], op_B[:, None, None] == OP["shear_x"],
       op_B[:, None, None] == OP["shear_y"]],
      [linear(cos_B, -sin_B, sin_B, cos_B), linear(one_B, shear_B, zero_B, one_B),
       linear(one_B, zero_B, shear_B, one_B)], identity)
  matrix_Bx2x3 = geometry.about_center(a_Bx2x2, (width - 1) / 2, (height - 1) / 2)
  shift_x_B = jnp.where(op_B == OP["translate_x"], 0.45 * signed_level_B * width, 0.0)
  shift_y_B = jnp.where(op_B == OP["translate_y"], 0.45 * signed_level_B * height, 0.0)
  return matrix_Bx2x3.at[:, :, 2].add(jnp.stack([shift_x_B, shift_y_B], -1))


def color_ops(x_BxSxSxC: jax.Array, op_B: jax.Array, signed_level_B: jax.Array,
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
    return jnp.isin(op_B, jnp.array([OP[name] for name in names]))[:, None, None, None]

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
