"""CPU implementations of the ViT's layers: the same values, written for XLA's CPU backend.

Chosen by the model's `kernels` switch (`VisionTransformer.kernels`, `config.kernels`);
the accelerator path uses plain linen layers and `jax.nn.dot_product_attention` instead.
Parameters, their names and their initial values are the same on both paths, so a
checkpoint trained on one runs on the other; outputs agree to float rounding
(tests/test_models.py compares logits and gradients).

What the hand-written backward passes avoid (each kept because a profile showed it;
docs/performance.md has the measurements and how to repeat them):
- dense layers: autodiff forms the weight gradient as (g^T a)^T, which makes XLA's CPU dot
  copy g (the big operand) into a transposed layout first; a^T g transposes the small one;
- q/k/v from one matmul and attention with its own backward pass that writes the
  B x L x 3 x H x K gradient in one pass, and recomputes its dropout mask from the key;
- LayerNorm keeps per-row statistics only (autodiff keeps a full-size 1/std), fenced so
  that the reduce fusion does not grow into full-size copies of them;
- GELU keeps x alone (autodiff also keeps tanh(.) or erf(.));
- dropout draws its mask from a keyed integer hash: threefry's rolled loops on CPU are
  slow, the hash costs a few integer ops per element and fuses into its consumer.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any

# Python floats: weakly typed, so bfloat16 activations stay bfloat16.
_SQRT_2_OVER_PI = float(np.sqrt(2 / np.pi))
_TANH_CUBIC = 0.044715


# --- GELU --------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: Array, approximate: bool) -> Array:
  """GELU: the tanh form x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (`nn.gelu`'s
  default) or the exact x Phi(x) = x/2 (1 + erf(x / sqrt 2)).

  XLA's native erf is one fused polynomial; `nn.gelu`'s erfc form expands into exp,
  selects and two loops on CPU, for the same values to 1e-6 absolute.
  """
  if approximate:
    inner = _SQRT_2_OVER_PI * x * (1 + _TANH_CUBIC * x * x)
    return 0.5 * x * (1 + jnp.tanh(inner))
  return x * (0.5 + 0.5 * lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


def _gelu_fwd(x, approximate):
  return gelu(x, approximate), x


def _gelu_bwd(approximate, x, g):
  if approximate:
    x2 = x * x
    t = jnp.tanh(_SQRT_2_OVER_PI * x * (1 + _TANH_CUBIC * x2))
    slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (
        1 + 3 * _TANH_CUBIC * x2)
  else:
    slope = (0.5 + 0.5 * lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype))
             + x * jnp.exp(-0.5 * x * x) * np.asarray(1 / np.sqrt(2 * np.pi), x.dtype))
  return ((g * slope).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# --- Dense layers ------------------------------------------------------------------------


@jax.custom_vjp
def _matmul(a_NxK: Array, b_KxF: Array) -> Array:
  return a_NxK @ b_KxF


def _matmul_fwd(a_NxK, b_KxF):
  return a_NxK @ b_KxF, (a_NxK, b_KxF)


def _matmul_bwd(residuals, g_NxF):
  a_NxK, b_KxF = residuals
  # XLA's CPU dot wants the contracted axis of its left operand minor: a^T g transposes
  # the small activation, where autodiff's (g^T a)^T would copy g.
  da_NxK = lax.dot_general(g_NxF, b_KxF, (((1,), (1,)), ((), ())))
  db_KxF = lax.dot_general(a_NxK, g_NxF, (((0,), (0,)), ((), ())))
  return da_NxK.astype(a_NxK.dtype), db_KxF.astype(b_KxF.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def affine(a_NxK: Array, b_KxF: Array, c_F: Array) -> Array:
  """a @ b + c with the backward pass of `_matmul`."""
  return a_NxK @ b_KxF + c_F


def _affine_fwd(a_NxK, b_KxF, c_F):
  return affine(a_NxK, b_KxF, c_F), (a_NxK, b_KxF)


def _affine_bwd(residuals, g_NxF):
  # The bias gradient sums the same 2-D g the two matmuls read: summed in another shape
  # (autodiff's B x L x ...), XLA wrote g into memory once per shape.
  da_NxK, db_KxF = _matmul_bwd(residuals, g_NxF)
  return da_NxK, db_KxF, jnp.sum(g_NxF, 0).astype(residuals[1].dtype)


affine.defvjp(_affine_fwd, _affine_bwd)


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`lax.dot_general` for dense layers (trailing axes of lhs x leading axes of rhs) as
  one 2-D matmul with a hand-written backward pass (see `_matmul_bwd`)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  if (lhs_batch or rhs_batch or precision is not None
      or preferred_element_type is not None
      or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(n))):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  free_shape, out_shape = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
  contract = int(np.prod(rhs.shape[:n]))
  y = _matmul(lhs.reshape(-1, contract), rhs.reshape(contract, -1))
  return y.reshape(*free_shape, *out_shape)


# --- Dropout -------------------------------------------------------------------------------


def _mix32(x: Array) -> Array:
  """A 32-bit integer bijection with full avalanche (Wellons' lowbias32)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_keep_mask(key: Array, shape: tuple[int, ...], rate: float) -> Array:
  """Bernoulli(1 - rate) mask: a keyed counter-based hash of each element's index.

  Two key words from `key` (threefry) seed a hash of the flat index, so the mask is a
  pure function of (key, shape) like `jax.random.bernoulli`. The keep probability is
  exact to 2**-32.
  """
  size = int(np.prod(shape))
  if size >= 2**32:
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
  index = lax.iota(jnp.uint32, size).reshape(shape)
  bits = _mix32(_mix32(index ^ k0) + k1)
  return bits >= jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def dropout(module: nn.Module, x: Array, rate: float, train: bool) -> Array:
  """Inverted dropout like `nn.Dropout` (drawing from the "dropout" rng stream)."""
  if not train or rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = dropout_keep_mask(module.make_rng("dropout"), x.shape, rate)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


# --- Attention ------------------------------------------------------------------------------


def _head_matmul(a: Array, b: Array, a_contract: int, b_contract: int,
                 preferred_element_type=None) -> Array:
  """Matmul of B x H x . x . stacks, batched over the leading (B, H) axes."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))),
                         preferred_element_type=preferred_element_type)


def _attention_probs(q_BxHxLxK, k_BxHxTxK):
  # Logits accumulated and normalised in float32 whatever the compute dtype.
  logits_BxHxLxT = _head_matmul(q_BxHxLxK, k_BxHxTxK, 3, 3, jnp.float32)
  return jax.nn.softmax(logits_BxHxLxT, axis=-1)


def _maybe_drop(p_BxHxLxT: Array, key: Array | None, rate: float) -> Array:
  if key is None or rate == 0.0:
    return p_BxHxLxT
  keep = dropout_keep_mask(key, p_BxHxLxT.shape, rate)
  return jnp.where(keep, p_BxHxLxT / (1.0 - rate), 0.0)


def _attention_fwd(q_BxHxLxK, k_BxHxTxK, v_BxHxTxK, key, rate):
  p_BxHxLxT = _attention_probs(q_BxHxLxK, k_BxHxTxK)
  dropped_BxHxLxT = _maybe_drop(p_BxHxLxT, key, rate).astype(v_BxHxTxK.dtype)
  out_BxHxLxK = _head_matmul(dropped_BxHxLxT, v_BxHxTxK, 3, 2)
  return out_BxHxLxK, (q_BxHxLxK, k_BxHxTxK, v_BxHxTxK, p_BxHxLxT, key)


def _attention_bwd(rate, residuals, g_BxHxLxK):
  # The dropout mask is recomputed from its key rather than kept; every matmul is laid
  # out so that XLA's CPU dot needs no operand copies.
  q_BxHxLxK, k_BxHxTxK, v_BxHxTxK, p_BxHxLxT, key = residuals
  dtype = v_BxHxTxK.dtype
  dropped_BxHxLxT = _maybe_drop(p_BxHxLxT, key, rate).astype(dtype)
  dv_BxHxTxK = _head_matmul(dropped_BxHxLxT, g_BxHxLxK, 2, 2)
  d_dropped_BxHxLxT = _head_matmul(g_BxHxLxK, v_BxHxTxK, 3, 3, jnp.float32)
  dp_BxHxLxT = _maybe_drop(d_dropped_BxHxLxT, key, rate)
  dlogits_BxHxLxT = p_BxHxLxT * (dp_BxHxLxT - jnp.sum(dp_BxHxLxT * p_BxHxLxT, -1,
                                                      keepdims=True))
  dlogits_BxHxLxT = dlogits_BxHxLxT.astype(dtype)
  dq_BxHxLxK = _head_matmul(dlogits_BxHxLxT, k_BxHxTxK, 3, 2)
  dk_BxHxTxK = _head_matmul(dlogits_BxHxLxT, q_BxHxLxK, 2, 2)
  return dq_BxHxLxK, dk_BxHxTxK, dv_BxHxTxK, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fused_attention(qkv_BxLx3xHxK: Array, key: Array | None, rate: float) -> Array:
  """softmax(q k^T) [dropout] v, B x L x H x K, from fused projections (q already scaled)."""
  return _fused_attention_fwd(qkv_BxLx3xHxK, key, rate)[0]


def _fused_attention_fwd(qkv_BxLx3xHxK, key, rate):
  q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = jnp.transpose(qkv_BxLx3xHxK, (2, 0, 3, 1, 4))
  out_BxHxLxK, residuals = _attention_fwd(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, key, rate)
  return jnp.transpose(out_BxHxLxK, (0, 2, 1, 3)), residuals


def _fused_attention_bwd(rate, residuals, g_BxLxHxK):
  dq_BxHxLxK, dk_BxHxLxK, dv_BxHxLxK, _ = _attention_bwd(
      rate, residuals, jnp.transpose(g_BxLxHxK, (0, 2, 1, 3)))
  # One fusion writes the B x L x 3 x H x K gradient: autodiff of the split above pads
  # each gradient to the full 3 x B x H x L x K, adds them and transposes; stacking
  # head-major and then transposing made XLA copy it twice more.
  d_BxLx3xHxK = jnp.stack([jnp.transpose(d, (0, 2, 1, 3))
                           for d in (dq_BxHxLxK, dk_BxHxLxK, dv_BxHxLxK)], axis=2)
  return d_BxLx3xHxK, None


fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def self_attention(x_BxLxD: Array, projections, *, scale: float, key: Array | None,
                   rate: float, dtype: Dtype) -> Array:
  """softmax(q k^T * scale) [dropout] v, B x L x H x K: q, k and v from one matmul with the
  three kernels side by side. `projections` holds ((kernel D x H x K, bias H x K) for q, k,
  v); the scale is folded into the query kernel and bias (D x H x K, not L x K)."""
  (wq_DxHxK, bq_HxK), (wk_DxHxK, bk_HxK), (wv_DxHxK, bv_HxK) = projections
  w_Dx3xHxK = jnp.stack([wq_DxHxK * scale, wk_DxHxK, wv_DxHxK], 1).astype(dtype)
  b_3xHxK = jnp.stack([bq_HxK * scale, bk_HxK, bv_HxK]).astype(dtype)
  batch, length, width = x_BxLxD.shape
  qkv_BxLx3xHxK = affine(x_BxLxD.reshape(-1, width), w_Dx3xHxK.reshape(width, -1),
                         b_3xHxK.reshape(-1)).reshape(batch, length, *b_3xHxK.shape)
  return fused_attention(qkv_BxLx3xHxK, key, rate)


# --- LayerNorm ------------------------------------------------------------------------------


def _fusion_fence(stats: Array) -> Array:
  """Ends XLA's library (YNNPACK) reduce fusion at the per-row statistic: left alone, the
  fusion grew past the reduction into its broadcast and wrote full-size copies of mean
  and 1/std to memory."""
  return lax.optimization_barrier(stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: Array, scale_D: Array, bias_D: Array, eps: float) -> Array:
  return _layer_norm_fwd(x, scale_D, bias_D, eps)[0]


def _layer_norm_fwd(x, scale_D, bias_D, eps):
  x32 = x.astype(jnp.float32)
  mean = _fusion_fence(jnp.mean(x32, -1, keepdims=True))
  rstd = _fusion_fence(lax.rsqrt(jnp.mean(jnp.square(x32 - mean), -1, keepdims=True) + eps))
  normed = (x32 - mean) * rstd
  y = (normed * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(x.dtype)
  return y, (x, mean, rstd, scale_D)


def _layer_norm_bwd(eps, residuals, g):
  # Only the per-row mean and 1/std were kept; `normed` is recomputed.
  del eps
  x, mean, rstd, scale_D = residuals
  normed = (x.astype(jnp.float32) - mean) * rstd
  g32 = g.astype(jnp.float32)
  reduce_axes = tuple(range(g.ndim - 1))
  dscale_D = jnp.sum(g32 * normed, reduce_axes)
  dbias_D = jnp.sum(g32, reduce_axes)
  dnormed = g32 * scale_D.astype(jnp.float32)
  dx = rstd * (dnormed - jnp.mean(dnormed, -1, keepdims=True)
               - normed * jnp.mean(dnormed * normed, -1, keepdims=True))
  return dx.astype(x.dtype), dscale_D.astype(scale_D.dtype), dbias_D.astype(scale_D.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """`nn.LayerNorm(epsilon)` over the last axis (same `scale`/`bias` parameters), with
  statistics in float32 and a backward pass that keeps per-row statistics only."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale_D = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias_D = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return _layer_norm(x.astype(self.dtype), scale_D, bias_D, self.epsilon)
