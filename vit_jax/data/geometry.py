"""Affine warps of image batches in JAX, and the integer/uniform draws the random ops share.

`warp_affine` is the one resampler of every geometric augmentation (rotation, zoom,
inception crop, RandAugment's geometric ops): bilinear, 4 gathered taps per output pixel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def lerp(u: jax.Array, low: float, high: float) -> jax.Array:
  """Maps uniform [0, 1) draws to [low, high)."""
  return low + u * (high - low)


def randint(bits: jax.Array, high: jax.Array | int) -> jax.Array:
  """Maps random uint32 words to integers in [0, high) (bias below high / 2**32).

  Integer remainder also counts as expensive for XLA, so the per-image result is computed
  once rather than fused into, and recomputed by, every per-pixel loop that reads it.
  """
  return (bits % jnp.asarray(high, jnp.uint32)).astype(jnp.int32)


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
  return about_center(a_Bx2x2, cx, cy)


def about_center(a_Bx2x2: jax.Array, cx: float, cy: float) -> jax.Array:
  """Affine matrix applying the linear map `a` about (cx, cy): p -> a (p - c) + c."""
  center_2 = jnp.array([cx, cy], jnp.float32)
  offset_Bx2 = center_2 - jnp.einsum("bij,j->bi", a_Bx2x2, center_2)
  return jnp.concatenate([a_Bx2x2, offset_Bx2[:, :, None]], axis=-1)
