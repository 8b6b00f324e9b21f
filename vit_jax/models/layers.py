"""The ViT's layers, each computed the way the model's `kernels` switch picks.

`resolve_kernels` is the only place that looks at the backend: "cpu" runs the
hand-written layers of `cpu_kernels.py`; "xla" plain linen layers and XLA's attention;
"cudnn" the same layers with cuDNN's fused (flash) attention; "auto" picks cpu on CPU,
cudnn on a GPU where cuDNN takes the dtype and head size, else xla. Every path has the
same parameters (names, shapes, initial values) and the same outputs to float rounding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import cpu_kernels

Array = jax.Array
Dtype = Any

KERNELS = ("auto", "cpu", "xla", "cudnn")


def cudnn_attention_problem(dtype: Dtype, head_dim: int) -> str | None:
  """Why cuDNN's fused attention cannot run this attention, or None when it can."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"it needs bfloat16 or float16 compute (got {jnp.dtype(dtype).name})"
  if head_dim % 8 or head_dim > 128:
    return f"it needs a head size that is a multiple of 8 and at most 128 (got {head_dim})"
  return None


def resolve_kernels(kernels: str, backend: str, dtype: Dtype, head_dim: int) -> str:
  """"cpu", "xla" or "cudnn": what `kernels` means for this backend, dtype and head size."""
  if kernels not in KERNELS:
    raise ValueError(f"kernels={kernels!r}: use one of {KERNELS}.")
  if kernels == "cudnn":
    problem = ("it needs a GPU" if backend != "gpu"
               else cudnn_attention_problem(dtype, head_dim))
    if problem:
      raise ValueError(f"kernels='cudnn' cannot run here: {problem}. Use kernels='auto'.")
  if kernels != "auto":
    return kernels
  if backend == "cpu":
    return "cpu"
  if backend == "gpu" and cudnn_attention_problem(dtype, head_dim) is None:
    return "cudnn"
  return "xla"


def dot_product_attention(q_BxLxHxK: Array, k_BxLxHxK: Array, v_BxLxHxK: Array,
                          implementation: str | None, pad_odd_length: bool) -> Array:
  """softmax(q k^T / sqrt(K)) v by `jax.nn.dot_product_attention`.

  cuDNN's training kernel is always given a bias operand, and then refuses odd sequence
  lengths (65 tokens: a class token and 8 x 8 patches). `pad_odd_length` adds one token,
  masked out of the keys and sliced off the output: the result is the unpadded one.
  """
  length = q_BxLxHxK.shape[1]
  if not (pad_odd_length and length % 2):
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                                        implementation=implementation)
  pad = ((0, 0), (0, 1), (0, 0), (0, 0))
  q_BxPxHxK, k_BxPxHxK, v_BxPxHxK = (jnp.pad(t, pad) for t in (q_BxLxHxK, k_BxLxHxK,
                                                                v_BxLxHxK))
  lengths_B = jnp.full((q_BxLxHxK.shape[0],), length, jnp.int32)
  out_BxPxHxK = jax.nn.dot_product_attention(q_BxPxHxK, k_BxPxHxK, v_BxPxHxK,
                                             key_value_seq_lengths=lengths_B,
                                             implementation=implementation)
  return out_BxPxHxK[:, :length]


def dense(features, *, cpu: bool, **kwargs) -> nn.Dense:
  return nn.Dense(features, dot_general=cpu_kernels.dense_dot_general if cpu else None,
                  **kwargs)


def gelu(x: Array, approximate: bool, cpu: bool) -> Array:
  if cpu:
    return cpu_kernels.gelu(x, approximate)
  return nn.gelu(x, approximate=approximate)


def dropout(module: nn.Module, x: Array, rate: float, train: bool, cpu: bool) -> Array:
  """Inverted dropout from the "dropout" rng stream (called inside `module`'s compact
  method, where `nn.Dropout` binds to it)."""
  if cpu:
    return cpu_kernels.dropout(module, x, rate, train)
  return nn.Dropout(rate, deterministic=not train)(x)


def layer_norm(name: str, dtype: Dtype, cpu: bool) -> nn.Module:
  """LayerNorm(eps 1e-6) with float32 parameters and statistics."""
  if cpu:
    return cpu_kernels.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


def drop_path(module: nn.Module, x_BxLxD: Array, rate: Array | float, train: bool,
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
  cpu: bool  # The layers of cpu_kernels.py.

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool) -> Array:
    cpu = self.cpu
    mlp_dense = lambda features, name: dense(  # noqa: E731
        features, cpu=cpu, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    y_BxLxM = gelu(mlp_dense(self.mlp_dim, "Dense_0")(x_BxLxD), self.gelu_approximate, cpu)
    y_BxLxM = dropout(self, y_BxLxM, self.dropout_rate, train, cpu)
    y_BxLxD = mlp_dense(x_BxLxD.shape[-1], "Dense_1")(y_BxLxM)
    if self.activate_output:
      y_BxLxD = gelu(y_BxLxD, self.gelu_approximate, cpu)
    return dropout(self, y_BxLxD, self.dropout_rate, train, cpu)


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
  The attention weights are materialised only when asked for or dropped out; otherwise
  the CPU path runs `cpu_kernels.self_attention`, the others `dot_product_attention`.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float
  dtype: Dtype
  kernels: str  # Resolved: "cpu", "xla" or "cudnn".

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool,
               return_weights: bool) -> tuple[Array, Array | None]:
    cpu = self.kernels == "cpu"
    features = (self.num_heads, self.head_dim)
    projections = [_ProjectionParams(x_BxLxD.shape[-1], features, name=n)()
                   for n in ("query", "key", "value")]
    x_BxLxD = x_BxLxD.astype(self.dtype)
    scale = float(1.0 / np.sqrt(self.head_dim))  # Weakly typed: bfloat16 stays bfloat16.
    weights_BxHxLxL = None
    if cpu and not return_weights:
      rate = self.dropout_rate if train else 0.0
      key = self.make_rng("dropout") if rate > 0 else None
      out_BxLxHxK = cpu_kernels.self_attention(x_BxLxD, projections, scale=scale, key=key,
                                               rate=rate, dtype=self.dtype)
    else:
      dot_general = cpu_kernels.dense_dot_general if cpu else jax.lax.dot_general
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
          dot_general(x_BxLxD, w.astype(self.dtype), (((2,), (0,)), ((), ())))
          + b.astype(self.dtype) for w, b in projections)
      if return_weights or (train and self.dropout_rate > 0):
        logits_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK * scale, k_BxLxHxK,
                                    preferred_element_type=jnp.float32)
        weights_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1)
        dropped_BxHxLxL = dropout(self, weights_BxHxLxL, self.dropout_rate, train, cpu)
        out_BxLxHxK = jnp.einsum("bhqt,bthk->bqhk", dropped_BxHxLxL.astype(self.dtype),
                                 v_BxLxHxK)
      else:
        cudnn = self.kernels == "cudnn"
        out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                                            "cudnn" if cudnn else None, pad_odd_length=cudnn)
    out_BxLxD = nn.DenseGeneral(
        x_BxLxD.shape[-1], axis=(-2, -1), dtype=self.dtype,
        dot_general=cpu_kernels.dense_dot_general if cpu else None,
        kernel_init=nn.initializers.xavier_uniform(), name="out")(out_BxLxHxK)
    return out_BxLxD, weights_BxHxLxL


class _ProbeAttention(nn.Module):
  """One query per example (the probe) attending over the tokens, with flax
  MultiHeadDotProductAttention's `query/key/value/out` parameters (big_vision's MAP head).
  Plain einsums on both kernel paths: one query row costs little."""
  num_heads: int
  dtype: Dtype
  cpu: bool  # The dense layers of cpu_kernels.py.

  @nn.compact
  def __call__(self, probe_1x1xD: Array, x_BxNxD: Array) -> Array:
    d = x_BxNxD.shape[-1]
    head_dim = d // self.num_heads
    (wq, bq), (wk, bk), (wv, bv) = [
        _ProjectionParams(d, (self.num_heads, head_dim), name=n)()
        for n in ("query", "key", "value")]
    dot_general = cpu_kernels.dense_dot_general if self.cpu else jax.lax.dot_general
    dims = (((2,), (0,)), ((), ()))
    project = lambda x, w, b: (dot_general(x, w.astype(self.dtype), dims)  # noqa: E731
                               + b.astype(self.dtype))
    q_1x1xHxK = project(probe_1x1xD.astype(self.dtype), wq, bq)
    k_BxNxHxK, v_BxNxHxK = (project(x_BxNxD, w, b) for w, b in ((wk, bk), (wv, bv)))
    scale = float(1.0 / np.sqrt(head_dim))  # Weakly typed: bfloat16 stays bfloat16.
    logits_BxHx1xN = jnp.einsum("qhk,bthk->bhqt", q_1x1xHxK[0] * scale, k_BxNxHxK,
                                preferred_element_type=jnp.float32)
    weights_BxHx1xN = jax.nn.softmax(logits_BxHx1xN, axis=-1)
    out_Bx1xHxK = jnp.einsum("bhqt,bthk->bqhk", weights_BxHx1xN.astype(self.dtype), v_BxNxHxK)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, dot_general=(
        cpu_kernels.dense_dot_general if self.cpu else None),
        kernel_init=nn.initializers.xavier_uniform(), name="out")(out_Bx1xHxK)


class MAPHead(nn.Module):
  """Multi-head attention pooling, big_vision's `MAPHead` (its ViTs with pool_type="map",
  the SigLIP image towers): a learned probe attends over the tokens, then y + MLP(LN(y)).
  Parameters `probe`, `MultiHeadDotProductAttention_0`, `LayerNorm_0`, `MlpBlock_0`."""
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  dtype: Dtype
  cpu: bool  # The layers of cpu_kernels.py.

  @nn.compact
  def __call__(self, x_BxNxD: Array) -> Array:
    cpu = self.cpu
    probe_1x1xD = self.param("probe", nn.initializers.xavier_uniform(),
                             (1, 1, x_BxNxD.shape[-1]), jnp.float32)
    y_Bx1xD = _ProbeAttention(self.num_heads, self.dtype, cpu,
                              name="MultiHeadDotProductAttention_0")(
                                  probe_1x1xD, x_BxNxD.astype(self.dtype))
    mlp = MlpBlock(self.mlp_dim, 0.0, False, self.gelu_approximate, self.dtype, cpu,
                   name="MlpBlock_0")
    y_Bx1xD = y_Bx1xD + mlp(layer_norm("LayerNorm_0", self.dtype, cpu)(y_Bx1xD), False)
    return y_Bx1xD[:, 0]


class ConvStem(nn.Module):
  """3x3 convolution (SAME, stride 1) + GELU at full resolution, returned patch by patch.

  Output: B x N x (P*P*F), each patch's P x P pixels of F features in row-major order, which
  the patch embedding (a Dense named `embedding`) maps to tokens: together the same as a
  P x P, stride-P convolution over the feature map. Computed as one matmul over 3x3
  neighbourhoods gathered in patch order, not as XLA convolutions: on CPU the strided
  convolution's input gradient made the stem about twice as dear (docs/performance.md).
  """
  features: int
  patch_size: int
  gelu_approximate: bool
  dtype: Dtype
  cpu: bool

  @nn.compact
  def __call__(self, x_BxHxWxC: Array) -> Array:
    b, h, w, c = x_BxHxWxC.shape
    p, gh, gw = self.patch_size, h // self.patch_size, w // self.patch_size
    kernel_3x3xCxF = self.param("kernel", nn.initializers.lecun_normal(),
                                (3, 3, c, self.features), jnp.float32)
    bias_F = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Tap (i, j) of every pixel, the pixels grouped by patch: B x gh x gw x P x P x C.
    taps = [padded[:, i:i + h, j:j + w].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
            for i in range(3) for j in range(3)]
    neighbourhoods_BxGxGxPxPx9C = jnp.concatenate(taps, axis=-1)
    y = neighbourhoods_BxGxGxPxPx9C @ kernel_3x3xCxF.reshape(9 * c, -1).astype(self.dtype)
    y = gelu(y + bias_F.astype(self.dtype), self.gelu_approximate, self.cpu)
    return y.reshape(b, gh * gw, p * p * self.features)
