"""Vision Transformer (Flax linen) and the registry of named models.

Parameter names and shapes are those of the published ViT checkpoints
(`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_1,LayerNorm_2,MlpBlock_3}`,
`Transformer/encoder_norm`, `pre_logits`, `head`), so a published `.npz` maps onto the tree
key for key. Child names are given explicitly wherever a checkpoint depends on the path.

The model takes images that are already normalised (see `vit_jax.augment.eval_preprocess`)
and returns float32 logits:

  model = create_model("ViT-B/16", num_classes=1000)
  variables = model.init(jax.random.key(0), images_BxHxWxC, train=False)
  logits_BxK = model.apply(variables, images_BxHxWxC, train=False)
  logits_BxK, extra = model.apply(variables, images_BxHxWxC, train=False,
                                  return_intermediates=True)
  extra["pre_logits"]         # B x F pooled features fed to the head
  extra["attention_weights"]  # tuple over layers of B x heads x tokens x tokens
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gelu(x: Array, approximate: bool) -> Array:
  """GELU: the tanh form x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (`nn.gelu`'s
  default) or the exact x Phi(x) = x/2 (1 + erf(x / sqrt 2)).

  XLA's native erf is one fused polynomial; `nn.gelu`'s erfc form expands into exp,
  selects and two loops on CPU, for the same values to 1e-6 absolute. The backward pass
  keeps x alone and recomputes the rest: autodiff also stores tanh(.) or erf(.), one
  more full-size array written and read per MLP block.
  """
  if approximate:
    inner = _SQRT_2_OVER_PI * x * (1 + _TANH_CUBIC * x * x)
    return 0.5 * x * (1 + jnp.tanh(inner))
  return x * (0.5 + 0.5 * lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


def _gelu_fwd(x, approximate):
  return _gelu(x, approximate), x


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


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def _matmul(a_NxK: Array, b_KxF: Array) -> Array:
  return a_NxK @ b_KxF


def _matmul_fwd(a_NxK, b_KxF):
  return a_NxK @ b_KxF, (a_NxK, b_KxF)


def _matmul_bwd(residuals, g_NxF):
  a_NxK, b_KxF = residuals
  # Autodiff would form the weight gradient as (g^T a)^T; XLA's CPU dot wants the
  # contracted axis of its left operand minor, so g (the big one) was transposed in
  # memory first. a^T g transposes the small activation instead: 3x faster.
  da_NxK = lax.dot_general(g_NxF, b_KxF, (((1,), (1,)), ((), ())))
  db_KxF = lax.dot_general(a_NxK, g_NxF, (((0,), (0,)), ((), ())))
  return da_NxK.astype(a_NxK.dtype), db_KxF.astype(b_KxF.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def _affine(a_NxK: Array, b_KxF: Array, c_F: Array) -> Array:
  return a_NxK @ b_KxF + c_F


def _affine_fwd(a_NxK, b_KxF, c_F):
  return _affine(a_NxK, b_KxF, c_F), (a_NxK, b_KxF)


def _affine_bwd(residuals, g_NxF):
  # The bias gradient sums the same 2-D g the two matmuls read: summed in another shape
  # (autodiff's B x L x ...), XLA wrote g into memory twice, once per shape.
  da_NxK, db_KxF = _matmul_bwd(residuals, g_NxF)
  return da_NxK, db_KxF, jnp.sum(g_NxF, 0).astype(residuals[1].dtype)


_affine.defvjp(_affine_fwd, _affine_bwd)


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


# Contract the last axis of B x L x D with the first of a D x ... kernel.
_DENSE_DIMS = (((2,), (0,)), ((), ()))


def _head_matmul(a: Array, b: Array, a_contract: int, b_contract: int) -> Array:
  """Matmul of B x H x . x . stacks, batched over the leading (B, H) axes."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))))


def _attention_probs(q_BxHxLxK, k_BxHxTxK):
  logits_BxHxLxT = _head_matmul(q_BxHxLxK, k_BxHxTxK, 3, 3).astype(jnp.float32)
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
  # The dropout mask is recomputed from its key (a few integer ops per element) rather
  # than kept; every matmul is laid out so that XLA's CPU dot needs no operand copies.
  q_BxHxLxK, k_BxHxTxK, v_BxHxTxK, p_BxHxLxT, key = residuals
  dtype = v_BxHxTxK.dtype
  dropped_BxHxLxT = _maybe_drop(p_BxHxLxT, key, rate).astype(dtype)
  dv_BxHxTxK = _head_matmul(dropped_BxHxLxT, g_BxHxLxK, 2, 2)
  d_dropped_BxHxLxT = _head_matmul(g_BxHxLxK, v_BxHxTxK, 3, 3).astype(jnp.float32)
  dp_BxHxLxT = _maybe_drop(d_dropped_BxHxLxT, key, rate)
  dlogits_BxHxLxT = p_BxHxLxT * (dp_BxHxLxT - jnp.sum(dp_BxHxLxT * p_BxHxLxT, -1,
                                                      keepdims=True))
  dlogits_BxHxLxT = dlogits_BxHxLxT.astype(dtype)
  dq_BxHxLxK = _head_matmul(dlogits_BxHxLxT, k_BxHxTxK, 3, 2)
  dk_BxHxTxK = _head_matmul(dlogits_BxHxLxT, q_BxHxLxK, 2, 2)
  return dq_BxHxLxK, dk_BxHxTxK, dv_BxHxTxK, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_attention(qkv_BxLx3xHxK: Array, key: Array | None, rate: float) -> Array:
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
  # each gradient to the full 3 x B x H x L x K, adds them and transposes (a third of the
  # attention time); stacking head-major and then transposing made XLA copy it twice
  # more (once for the matmuls, once for the bias gradient).
  d_BxLx3xHxK = jnp.stack([jnp.transpose(d, (0, 2, 1, 3))
                           for d in (dq_BxHxLxK, dk_BxHxLxK, dv_BxHxLxK)], axis=2)
  return d_BxLx3xHxK, None


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def _cpu_fusion_fence(stats: Array) -> Array:
  """On CPU, ends XLA's library (YNNPACK) reduce fusion at the per-row statistic.

  Left alone, the fusion grew past the reduction into its broadcast and wrote full-size
  copies of mean and 1/std to memory (extra passes per LayerNorm: ~9% of a
  ViT-Ti/4 step). Other backends fuse it well and get the value unchanged.
  """
  return lax.optimization_barrier(stats) if jax.default_backend() == "cpu" else stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: Array, scale_D: Array, bias_D: Array, eps: float) -> Array:
  return _layer_norm_fwd(x, scale_D, bias_D, eps)[0]


def _layer_norm_fwd(x, scale_D, bias_D, eps):
  x32 = x.astype(jnp.float32)
  mean = _cpu_fusion_fence(jnp.mean(x32, -1, keepdims=True))
  rstd = _cpu_fusion_fence(
      lax.rsqrt(jnp.mean(jnp.square(x32 - mean), -1, keepdims=True) + eps))
  normed = (x32 - mean) * rstd
  y = (normed * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(x.dtype)
  return y, (x, mean, rstd, scale_D)


def _layer_norm_bwd(eps, residuals, g):
  # Autodiff keeps the broadcast 1/std (a full-size array) for the backward pass; here
  # only the per-row mean and 1/std are kept and `normed` is recomputed.
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
  """`nn.LayerNorm(epsilon)` over the last axis (same `scale`/`bias` parameters), with a
  backward pass that keeps per-row statistics only (see `_layer_norm_bwd`)."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale_D = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias_D = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return _layer_norm(x.astype(self.dtype), scale_D, bias_D, self.epsilon)


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
  pure function of (key, shape) like `jax.random.bernoulli`, but costs a few integer ops
  per element and fuses into its consumer; threefry's rolled loops on CPU made dropout
  on the attention weights a third of a training step. The keep probability is exact to
  2**-32.
  """
  size = int(np.prod(shape))
  if size >= 2**32:
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
  index = lax.iota(jnp.uint32, size).reshape(shape)
  bits = _mix32(_mix32(index ^ k0) + k1)
  return bits >= jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))


def _dropout(module: nn.Module, x: Array, rate: float, train: bool) -> Array:
  """Inverted dropout like `nn.Dropout` (drawing from the "dropout" rng stream)."""
  if not train or rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = dropout_keep_mask(module.make_rng("dropout"), x.shape, rate)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def _drop_path(module: nn.Module, x_BxLxD: Array, rate: Array | float, train: bool,
               enabled: bool) -> Array:
  """Stochastic depth: drops a sample's whole residual branch with probability `rate`.

  `rate` may be traced (one value per layer under scan), so it is applied with a
  Bernoulli mask rather than `nn.Dropout`, whose rate must be static.
  """
  if not (train and enabled):
    return x_BxLxD
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask_B = jax.random.bernoulli(module.make_rng("dropout"), keep, (x_BxLxD.shape[0],))
  scale_B = mask_B.astype(jnp.float32) / keep
  return x_BxLxD * scale_B[:, None, None].astype(x_BxLxD.dtype)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(D) [-> GELU] -> dropout."""
  mlp_dim: int
  dropout_rate: float
  activate_output: bool  # The Keras origin applies GELU after the second Dense too.
  gelu_approximate: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool) -> Array:
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, dot_general=dense_dot_general,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    y_BxLxM = _gelu(dense(self.mlp_dim, "Dense_0")(x_BxLxD), self.gelu_approximate)
    y_BxLxM = _dropout(self, y_BxLxM, self.dropout_rate, train)
    y_BxLxD = dense(x_BxLxD.shape[-1], "Dense_1")(y_BxLxM)
    if self.activate_output:
      y_BxLxD = _gelu(y_BxLxD, self.gelu_approximate)
    return _dropout(self, y_BxLxD, self.dropout_rate, train)


class _ProjectionParams(nn.Module):
  """The `kernel` (D x H x K) and `bias` (H x K) of `nn.DenseGeneral((H, K))` over the last
  axis, with its names, shapes and initial values, for callers that apply them fused."""
  in_features: int
  features: tuple[int, int]

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    flat_features = int(np.prod(self.features))
    init = nn.initializers.xavier_uniform()  # DenseGeneral draws 2-D, then reshapes.
    kernel = self.param(
        "kernel", lambda rng, shape, dtype: init(rng, (self.in_features, flat_features),
                                                 dtype).reshape(shape),
        (self.in_features, *self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, self.features, jnp.float32)
    return kernel, bias


class SelfAttention(nn.Module):
  """Multi-head self-attention with the published `query/key/value/out` parameters.

  q/k/v are num_heads x head_dim wide, which may differ from the residual width D
  (Keras MultiHeadAttention(num_heads=4, key_dim=64) in a 64-wide stream is 4 x 64).
  On CPU, q, k and v come from one matmul with the three kernels side by side, and
  `_fused_attention` (head-major, with its own backward pass) runs; elsewhere, without dropout
  on the weights and without a request for them, the fused
  `jax.nn.dot_product_attention` runs (cuDNN flash attention on GPU).
  """
  num_heads: int
  head_dim: int
  dropout_rate: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool,
               return_weights: bool) -> tuple[Array, Array | None]:
    features = (self.num_heads, self.head_dim)
    (wq_DxHxK, bq_HxK), (wk_DxHxK, bk_HxK), (wv_DxHxK, bv_HxK) = (
        _ProjectionParams(x_BxLxD.shape[-1], features, name=n)()
        for n in ("query", "key", "value"))
    x_BxLxD = x_BxLxD.astype(self.dtype)
    scale = 1.0 / np.sqrt(self.head_dim)
    weights_BxHxLxL = None
    if not return_weights and jax.default_backend() == "cpu":
      # The softmax scale is folded into the query kernel and bias (D x H x K, not L x K).
      w_Dx3xHxK = jnp.stack([wq_DxHxK * scale, wk_DxHxK, wv_DxHxK], 1).astype(self.dtype)
      b_3xHxK = jnp.stack([bq_HxK * scale, bk_HxK, bv_HxK]).astype(self.dtype)
      batch, length, width = x_BxLxD.shape
      qkv_BxLx3xHxK = _affine(x_BxLxD.reshape(-1, width), w_Dx3xHxK.reshape(width, -1),
                              b_3xHxK.reshape(-1)).reshape(batch, length, *b_3xHxK.shape)
      rate = self.dropout_rate if train else 0.0
      key = self.make_rng("dropout") if rate > 0 else None
      out_BxLxHxK = _fused_attention(qkv_BxLx3xHxK, key, rate)
    else:
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
          dense_dot_general(x_BxLxD, w.astype(self.dtype), _DENSE_DIMS)
          + b.astype(self.dtype)
          for w, b in ((wq_DxHxK, bq_HxK), (wk_DxHxK, bk_HxK), (wv_DxHxK, bv_HxK)))
      if return_weights or (train and self.dropout_rate > 0):
        logits_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK * scale, k_BxLxHxK)
        weights_BxHxLxL = jax.nn.softmax(logits_BxHxLxL.astype(jnp.float32), axis=-1)
        dropped_BxHxLxL = _dropout(self, weights_BxHxLxL, self.dropout_rate, train)
        out_BxLxHxK = jnp.einsum("bhqt,bthk->bqhk", dropped_BxHxLxL.astype(self.dtype),
                                 v_BxLxHxK)
      else:
        out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
    out_BxLxD = nn.DenseGeneral(x_BxLxD.shape[-1], axis=(-2, -1), dtype=self.dtype,
                                dot_general=dense_dot_general,
                                kernel_init=nn.initializers.xavier_uniform(),
                                name="out")(out_BxLxHxK)
    return out_BxLxD, weights_BxHxLxL


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float
  attention_dropout_rate: float
  residual_dropout: bool
  drop_path_enabled: bool
  mlp_activate_output: bool
  gelu_approximate: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x_BxLxD: Array, drop_path_rate: Array | float, train: bool,
               return_weights: bool) -> tuple[Array, Array | None]:
    norm = lambda name: LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)  # noqa: E731
    y_BxLxD, weights = SelfAttention(
        self.num_heads, self.head_dim, self.attention_dropout_rate, self.dtype,
        name="MultiHeadDotProductAttention_1")(norm("LayerNorm_0")(x_BxLxD), train,
                                               return_weights)
    if self.residual_dropout:
      y_BxLxD = _dropout(self, y_BxLxD, self.dropout_rate, train)
    x_BxLxD = x_BxLxD + _drop_path(self, y_BxLxD, drop_path_rate, train,
                                   self.drop_path_enabled)
    y_BxLxD = MlpBlock(self.mlp_dim, self.dropout_rate, self.mlp_activate_output,
                       self.gelu_approximate, self.dtype,
                       name="MlpBlock_3")(norm("LayerNorm_2")(x_BxLxD), train)
    x_BxLxD = x_BxLxD + _drop_path(self, y_BxLxD, drop_path_rate, train,
                                   self.drop_path_enabled)
    return x_BxLxD, weights


class _ScannedBlock(Encoder1DBlock):
  """The block in `nn.scan`'s (carry, xs) -> (carry, ys) form."""

  def __call__(self, x_BxLxD, drop_path_rate, train, return_weights):  # type: ignore[override]
    return super().__call__(x_BxLxD, drop_path_rate, train, return_weights)


class Encoder(nn.Module):
  """Position embedding, the blocks, and the final LayerNorm (`Transformer/...`)."""
  depth: int
  block_kwargs: dict
  dropout_rate: float
  residual_dropout: bool
  stochastic_depth_rate: float
  scan_layers: bool
  remat: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool,
               return_weights: bool) -> tuple[Array, tuple[Array, ...]]:
    x_BxLxD = AddPositionEmbedding(name="posembed_input")(x_BxLxD)
    if self.residual_dropout:
      x_BxLxD = _dropout(self, x_BxLxD, self.dropout_rate, train)
    # Stochastic depth grows linearly with depth (DeiT/timm): 0 at the first block.
    rates_L = np.linspace(0.0, self.stochastic_depth_rate, self.depth, dtype=np.float32)
    block_kwargs = dict(self.block_kwargs, dtype=self.dtype,
                        drop_path_enabled=self.stochastic_depth_rate > 0)
    block_cls = _ScannedBlock if self.scan_layers else Encoder1DBlock
    if self.remat:
      # Arguments 3 and 4 (train, return_weights) are Python bools; `self` is 0.
      block_cls = nn.remat(block_cls, static_argnums=(3, 4))
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth)
      x_BxLxD, weights_LxBxHxTxT = scanned(**block_kwargs, name="encoderblock")(
          x_BxLxD, jnp.asarray(rates_L), train, return_weights)
      weights = tuple(weights_LxBxHxTxT) if return_weights else ()
    else:
      weights = []
      for i in range(self.depth):
        x_BxLxD, w = block_cls(**block_kwargs, name=f"encoderblock_{i}")(
            x_BxLxD, float(rates_L[i]), train, return_weights)
        weights.append(w)
      weights = tuple(weights) if return_weights else ()
    x_BxLxD = LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x_BxLxD)
    return x_BxLxD, weights


class AddPositionEmbedding(nn.Module):
  """Learned position embedding, one vector per token (class token slot included)."""

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    pos_1xLxD = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                           (1, *x_BxLxD.shape[1:]), jnp.float32)
    return x_BxLxD + pos_1xLxD.astype(x_BxLxD.dtype)


class VisionTransformer(nn.Module):
  """ViT: patches -> [cls] + position embedding -> encoder -> pool -> [MLP] -> head."""
  num_classes: int
  patch_size: int
  width: int  # Residual stream width D.
  depth: int
  num_heads: int
  mlp_dim: int
  head_dim: int | None = None  # Attention width per head; None = width // num_heads.
  class_token: bool = True
  pool: str = "token"  # "token" (class token), "gap" (mean of patch tokens), "flatten".
  head_hidden_dims: Sequence[int] = ()  # Hidden MLP head (the Keras origin: 2048, 1024).
  representation_size: int | None = None  # A `pre_logits` Dense + tanh before the head.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  # Dropout on the embeddings and the attention output as in the published ViT; the
  # Keras origin drops only inside the MLP and on the attention weights.
  residual_dropout: bool = True
  head_dropout_rate: float = 0.0  # Before the hidden head layers and the head.
  stochastic_depth_rate: float = 0.0  # Drop-path rate at the last block.
  mlp_activate_output: bool = False
  # The tanh form, as the published ViT (flax `nn.gelu`'s default) was trained with; on
  # CPU it is also ~6% faster a ViT-Ti/4 step than erf. The Keras origin uses exact erf.
  gelu_approximate: bool = True
  zero_head_init: bool = True  # Zero head kernel, as the published ViT recipes.
  dtype: Dtype = jnp.float32  # Compute dtype; parameters are always float32.
  scan_layers: bool = False  # Params then stacked under Transformer/encoderblock.
  remat: bool = False

  @nn.compact
  def __call__(self, images_BxHxWxC: Array, *, train: bool,
               return_intermediates: bool = False):
    _, h, w, _ = images_BxHxWxC.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(
          f"Image size {h}x{w} is not divisible by the patch size {self.patch_size}: set "
          f"config.image_size to a multiple of {self.patch_size} (e.g. "
          f"{h // self.patch_size * self.patch_size or self.patch_size}).")
    if self.pool not in ("token", "gap", "flatten"):
      raise ValueError(f"pool={self.pool!r}: use one of 'token', 'gap', 'flatten'.")
    if self.pool == "token" and not self.class_token:
      raise ValueError("pool='token' needs class_token=True; use pool='gap' or 'flatten'.")
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding")(images_BxHxWxC.astype(self.dtype))
    b, gh, gw, d = x.shape
    x_BxNxD = x.reshape(b, gh * gw, d)
    if self.class_token:
      cls_1x1xD = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
      x_BxNxD = jnp.concatenate(
          [jnp.broadcast_to(cls_1x1xD.astype(x_BxNxD.dtype), (b, 1, d)), x_BxNxD], axis=1)
    block_kwargs = dict(
        num_heads=self.num_heads, head_dim=self.head_dim or self.width // self.num_heads,
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        residual_dropout=self.residual_dropout,
        mlp_activate_output=self.mlp_activate_output,
        gelu_approximate=self.gelu_approximate)
    x_BxNxD, weights = Encoder(
        self.depth, block_kwargs, self.dropout_rate, self.residual_dropout,
        self.stochastic_depth_rate, self.scan_layers, self.remat, self.dtype,
        name="Transformer")(x_BxNxD, train, return_intermediates)

    if self.pool == "token":
      x_BxF = x_BxNxD[:, 0]
    elif self.pool == "gap":
      x_BxF = x_BxNxD[:, int(self.class_token):].mean(axis=1)
    else:
      x_BxF = x_BxNxD.reshape(b, -1)
    x_BxF = _dropout(self, x_BxF, self.head_dropout_rate, train)
    for i, features in enumerate(self.head_hidden_dims):
      x_BxF = _gelu(nn.Dense(features, dtype=self.dtype, dot_general=dense_dot_general,
                             name=f"head_hidden_{i}")(x_BxF),
                    self.gelu_approximate)
      x_BxF = _dropout(self, x_BxF, self.head_dropout_rate, train)
    if self.representation_size:
      x_BxF = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                                dot_general=dense_dot_general,
                                name="pre_logits")(x_BxF))
    head_init = nn.initializers.zeros if self.zero_head_init else nn.initializers.lecun_normal()
    logits_BxK = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=head_init,
                          dot_general=dense_dot_general,
                          name="head")(x_BxF).astype(jnp.float32)
    if return_intermediates:
      return logits_BxK, {"pre_logits": x_BxF.astype(jnp.float32),
                          "attention_weights": weights}
    return logits_BxK


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registry entry: VisionTransformer fields and the resolution it is meant for."""
  fields: dict
  image_size: int


def _vit(width: int, depth: int, heads: int, mlp: int, patch: int, image_size: int,
         **extra) -> ModelSpec:
  return ModelSpec(dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
                        patch_size=patch, **extra), image_size)


_SIZES = {  # width, depth, heads, mlp (Dosovitskiy et al. 2021; Ti and S from DeiT).
    "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096), "H": (1280, 32, 16, 5120),
}

_REGISTRY: dict[str, ModelSpec] = {
    **{f"ViT-{s}/{p}": _vit(*_SIZES[s], patch=p, image_size=224) for s, p in [
        ("Ti", 16), ("S", 16), ("B", 16), ("L", 16), ("H", 14), ("S", 32), ("B", 32),
        ("L", 32), ("B", 8)]},
    # Small-image variants for 32 px data: 8 x 8 = 64 patches of 4 x 4.
    "ViT-Ti/4": _vit(*_SIZES["Ti"], patch=4, image_size=32),
    "ViT-S/4": _vit(*_SIZES["S"], patch=4, image_size=32),
    # The Keras "Image classification with Vision Transformer" example: 72 px, patch 6
    # (144 tokens), width 64, 8 blocks, MultiHeadAttention(num_heads=4, key_dim=64),
    # block MLP [128, 64] with GELU on both, no class token, flatten -> [2048, 1024] -> K.
    "keras-example": _vit(
        64, 8, 4, 128, patch=6, image_size=72, head_dim=64, class_token=False,
        pool="flatten", head_hidden_dims=(2048, 1024), dropout_rate=0.1,
        attention_dropout_rate=0.1, residual_dropout=False, head_dropout_rate=0.5,
        mlp_activate_output=True, gelu_approximate=False, zero_head_init=False),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(VisionTransformer)
                if f.name not in ("parent", "name"))


def list_models() -> list[str]:
  return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}. Registered models: {', '.join(_REGISTRY)}.")
  return _REGISTRY[name]


def create_model(name: str, *, num_classes: int, **overrides) -> VisionTransformer:
  """The registered model `name` with `num_classes` outputs; overrides set any field."""
  unknown = sorted(set(overrides) - set(_FIELDS))
  if unknown:
    raise ValueError(f"Unknown model option(s) {unknown} for {name!r}; "
                     f"allowed: {', '.join(_FIELDS)}.")
  if isinstance(overrides.get("dtype"), str):
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  return VisionTransformer(**{**get_spec(name).fields, "num_classes": num_classes,
                              **overrides})


def count_params(model: nn.Module, image_size: int, channels: int = 3) -> int:
  """Parameter count from shapes alone (no memory is allocated)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)),
                         train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
