"""Vision Transformer (Flax linen); the named models are in `registry.py`.

Parameter names and shapes are those of the published ViT checkpoints
(`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_1,LayerNorm_2,MlpBlock_3}`,
`Transformer/encoder_norm`, `pre_logits`, `head`), so a published `.npz` maps onto the tree
key for key. Child names are given explicitly wherever a checkpoint depends on the path.
The variants add big_vision's names: `posemb="sincos2d"` computes its table (no
`posembed_input`), `pool="map"` adds `MAPHead_0` (`probe`, `MultiHeadDotProductAttention_0`,
`LayerNorm_0`, `MlpBlock_0`), `num_registers=R` adds `registers` (1 x R x D).

The model takes images that are already normalised (`vit_jax.data.augment.eval_preprocess`)
and returns float32 logits:

  model = create_model("ViT-B/16", num_classes=1000)
  variables = model.init(jax.random.key(0), images_BxHxWxC, train=False)
  logits_BxK = model.apply(variables, images_BxHxWxC, train=False)
  logits_BxK, extra = model.apply(variables, images_BxHxWxC, train=False,
                                  return_intermediates=True)
  extra["pre_logits"]         # B x F pooled features fed to the head
  extra["attention_weights"]  # tuple over layers of B x heads x tokens x tokens

`kernels` picks how the layers are computed, the only place that looks at the backend:
"xla" runs plain linen layers and `jax.nn.dot_product_attention` (the accelerator path),
"cpu" the hand-written layers of `cpu_kernels.py`, "auto" the latter on CPU only. Both
paths have the same parameters and give the same outputs to float rounding.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import cpu_kernels

Array = jax.Array
Dtype = Any

KERNELS = ("auto", "cpu", "xla")


def uses_cpu_kernels(kernels: str) -> bool:
  """Whether `kernels` ("auto", "cpu" or "xla") means the CPU layers on this backend."""
  if kernels not in KERNELS:
    raise ValueError(f"kernels={kernels!r}: use one of {KERNELS}.")
  return kernels == "cpu" or (kernels == "auto" and jax.default_backend() == "cpu")


def _dense(features, *, cpu: bool, **kwargs) -> nn.Dense:
  return nn.Dense(features, dot_general=cpu_kernels.dense_dot_general if cpu else None,
                  **kwargs)


def _gelu(x: Array, approximate: bool, cpu: bool) -> Array:
  if cpu:
    return cpu_kernels.gelu(x, approximate)
  return nn.gelu(x, approximate=approximate)


def _dropout(module: nn.Module, x: Array, rate: float, train: bool, cpu: bool) -> Array:
  """Inverted dropout from the "dropout" rng stream (called inside `module`'s compact
  method, where `nn.Dropout` binds to it)."""
  if cpu:
    return cpu_kernels.dropout(module, x, rate, train)
  return nn.Dropout(rate, deterministic=not train)(x)


def _layer_norm(name: str, dtype: Dtype, cpu: bool) -> nn.Module:
  """LayerNorm(eps 1e-6) with float32 parameters and statistics."""
  if cpu:
    return cpu_kernels.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


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
  cpu_kernels: bool

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool) -> Array:
    cpu = self.cpu_kernels
    dense = lambda features, name: _dense(  # noqa: E731
        features, cpu=cpu, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    y_BxLxM = _gelu(dense(self.mlp_dim, "Dense_0")(x_BxLxD), self.gelu_approximate, cpu)
    y_BxLxM = _dropout(self, y_BxLxM, self.dropout_rate, train, cpu)
    y_BxLxD = dense(x_BxLxD.shape[-1], "Dense_1")(y_BxLxM)
    if self.activate_output:
      y_BxLxD = _gelu(y_BxLxD, self.gelu_approximate, cpu)
    return _dropout(self, y_BxLxD, self.dropout_rate, train, cpu)


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
  the CPU path runs `cpu_kernels.self_attention` and the XLA path
  `jax.nn.dot_product_attention`.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float
  dtype: Dtype
  cpu_kernels: bool

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool,
               return_weights: bool) -> tuple[Array, Array | None]:
    cpu = self.cpu_kernels
    features = (self.num_heads, self.head_dim)
    projections = [_ProjectionParams(x_BxLxD.shape[-1], features, name=n)()
                   for n in ("query", "key", "value")]
    x_BxLxD = x_BxLxD.astype(self.dtype)
    scale = 1.0 / np.sqrt(self.head_dim)
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
        logits_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK * scale, k_BxLxHxK)
        weights_BxHxLxL = jax.nn.softmax(logits_BxHxLxL.astype(jnp.float32), axis=-1)
        dropped_BxHxLxL = _dropout(self, weights_BxHxLxL, self.dropout_rate, train, cpu)
        out_BxLxHxK = jnp.einsum("bhqt,bthk->bqhk", dropped_BxHxLxL.astype(self.dtype),
                                 v_BxLxHxK)
      else:
        out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
    out_BxLxD = nn.DenseGeneral(
        x_BxLxD.shape[-1], axis=(-2, -1), dtype=self.dtype,
        dot_general=cpu_kernels.dense_dot_general if cpu else None,
        kernel_init=nn.initializers.xavier_uniform(), name="out")(out_BxLxHxK)
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
  cpu_kernels: bool

  @nn.compact
  def __call__(self, x_BxLxD: Array, drop_path_rate: Array | float, train: bool,
               return_weights: bool) -> tuple[Array, Array | None]:
    cpu = self.cpu_kernels
    y_BxLxD, weights = SelfAttention(
        self.num_heads, self.head_dim, self.attention_dropout_rate, self.dtype, cpu,
        name="MultiHeadDotProductAttention_1")(
            _layer_norm("LayerNorm_0", self.dtype, cpu)(x_BxLxD), train, return_weights)
    if self.residual_dropout:
      y_BxLxD = _dropout(self, y_BxLxD, self.dropout_rate, train, cpu)
    x_BxLxD = x_BxLxD + _drop_path(self, y_BxLxD, drop_path_rate, train,
                                   self.drop_path_enabled)
    y_BxLxD = MlpBlock(self.mlp_dim, self.dropout_rate, self.mlp_activate_output,
                       self.gelu_approximate, self.dtype, cpu, name="MlpBlock_3")(
                           _layer_norm("LayerNorm_2", self.dtype, cpu)(x_BxLxD), train)
    x_BxLxD = x_BxLxD + _drop_path(self, y_BxLxD, drop_path_rate, train,
                                   self.drop_path_enabled)
    return x_BxLxD, weights


class _ScannedBlock(Encoder1DBlock):
  """The block in `nn.scan`'s (carry, xs) -> (carry, ys) form."""

  def __call__(self, x_BxLxD, drop_path_rate, train, return_weights):  # type: ignore[override]
    return super().__call__(x_BxLxD, drop_path_rate, train, return_weights)


def posemb_sincos2d(height: int, width: int, features: int,
                    temperature: float = 10_000.0) -> np.ndarray:
  """big_vision's fixed 2-D sin-cos position embedding (MoCo v3): 1 x (H*W) x features.

  Tokens in row-major order; the channels are [sin(x w), cos(x w), sin(y w), cos(y w)],
  each features/4 wide, with x the column, y the row and w_k = temperature^(-k / (F/4 - 1)).
  Computed in float64 and rounded once to float32.
  """
  if features % 4 or features < 8:
    raise ValueError(f"posemb='sincos2d' needs a width that is a multiple of 4 and >= 8, "
                     f"not {features}.")
  y_HxW, x_HxW = np.mgrid[:height, :width].astype(np.float64)
  quarter = features // 4
  omega_Q = temperature ** -(np.arange(quarter) / (quarter - 1))
  x_NxQ = x_HxW.reshape(-1, 1) * omega_Q
  y_NxQ = y_HxW.reshape(-1, 1) * omega_Q
  table_NxF = np.concatenate([np.sin(x_NxQ), np.cos(x_NxQ), np.sin(y_NxQ), np.cos(y_NxQ)], 1)
  return table_NxF[None].astype(np.float32)


class AddPositionEmbedding(nn.Module):
  """Learned position embedding, one vector per token (class token slot included)."""

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    pos_1xLxD = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                           (1, *x_BxLxD.shape[1:]), jnp.float32)
    return x_BxLxD + pos_1xLxD.astype(x_BxLxD.dtype)


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
  cpu_kernels: bool
  learned_posemb: bool = True  # False: the caller added a fixed (sincos2d) embedding.

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool, return_weights: bool,
               registers_1xRxD: Array | None = None,
               registers_at: int = 0) -> tuple[Array, tuple[Array, ...]]:
    if self.learned_posemb:
      x_BxLxD = AddPositionEmbedding(name="posembed_input")(x_BxLxD)
    if registers_1xRxD is not None:
      # Registers have no position (Darcet et al. 2023; timm): inserted after the table is
      # added, between the class token and the patches.
      registers_BxRxD = jnp.broadcast_to(registers_1xRxD.astype(x_BxLxD.dtype),
                                         (x_BxLxD.shape[0], *registers_1xRxD.shape[1:]))
      x_BxLxD = jnp.concatenate([x_BxLxD[:, :registers_at], registers_BxRxD,
                                 x_BxLxD[:, registers_at:]], axis=1)
    if self.residual_dropout:
      x_BxLxD = _dropout(self, x_BxLxD, self.dropout_rate, train, self.cpu_kernels)
    # Stochastic depth grows linearly with depth (DeiT/timm): 0 at the first block.
    rates_L = np.linspace(0.0, self.stochastic_depth_rate, self.depth, dtype=np.float32)
    block_kwargs = dict(self.block_kwargs, dtype=self.dtype, cpu_kernels=self.cpu_kernels,
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
    x_BxLxD = _layer_norm("encoder_norm", self.dtype, self.cpu_kernels)(x_BxLxD)
    return x_BxLxD, weights


class _ProbeAttention(nn.Module):
  """One query per example (the probe) attending over the tokens, with flax
  MultiHeadDotProductAttention's `query/key/value/out` parameters (big_vision's MAP head).
  Plain einsums on both kernel paths: one query row costs little."""
  num_heads: int
  dtype: Dtype
  cpu_kernels: bool

  @nn.compact
  def __call__(self, probe_1x1xD: Array, x_BxNxD: Array) -> Array:
    d = x_BxNxD.shape[-1]
    head_dim = d // self.num_heads
    (wq, bq), (wk, bk), (wv, bv) = [
        _ProjectionParams(d, (self.num_heads, head_dim), name=n)()
        for n in ("query", "key", "value")]
    dot_general = cpu_kernels.dense_dot_general if self.cpu_kernels else jax.lax.dot_general
    dims = (((2,), (0,)), ((), ()))
    project = lambda x, w, b: (dot_general(x, w.astype(self.dtype), dims)  # noqa: E731
                               + b.astype(self.dtype))
    q_1x1xHxK = project(probe_1x1xD.astype(self.dtype), wq, bq)
    k_BxNxHxK, v_BxNxHxK = (project(x_BxNxD, w, b) for w, b in ((wk, bk), (wv, bv)))
    logits_BxHx1xN = jnp.einsum("qhk,bthk->bhqt", q_1x1xHxK[0] / np.sqrt(head_dim), k_BxNxHxK)
    weights_BxHx1xN = jax.nn.softmax(logits_BxHx1xN.astype(jnp.float32), axis=-1)
    out_Bx1xHxK = jnp.einsum("bhqt,bthk->bqhk", weights_BxHx1xN.astype(self.dtype), v_BxNxHxK)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, dot_general=(
        cpu_kernels.dense_dot_general if self.cpu_kernels else None),
        kernel_init=nn.initializers.xavier_uniform(), name="out")(out_Bx1xHxK)


class MAPHead(nn.Module):
  """Multi-head attention pooling, big_vision's `MAPHead` (its ViTs with pool_type="map",
  the SigLIP image towers): a learned probe attends over the tokens, then y + MLP(LN(y)).
  Parameters `probe`, `MultiHeadDotProductAttention_0`, `LayerNorm_0`, `MlpBlock_0`."""
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  dtype: Dtype
  cpu_kernels: bool

  @nn.compact
  def __call__(self, x_BxNxD: Array) -> Array:
    cpu = self.cpu_kernels
    probe_1x1xD = self.param("probe", nn.initializers.xavier_uniform(),
                             (1, 1, x_BxNxD.shape[-1]), jnp.float32)
    y_Bx1xD = _ProbeAttention(self.num_heads, self.dtype, cpu,
                              name="MultiHeadDotProductAttention_0")(
                                  probe_1x1xD, x_BxNxD.astype(self.dtype))
    mlp = MlpBlock(self.mlp_dim, 0.0, False, self.gelu_approximate, self.dtype, cpu,
                   name="MlpBlock_0")
    y_Bx1xD = y_Bx1xD + mlp(_layer_norm("LayerNorm_0", self.dtype, cpu)(y_Bx1xD), False)
    return y_Bx1xD[:, 0]


POOLS = ("token", "gap", "map", "flatten")
POSEMBS = ("learned", "sincos2d")


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
  # "token" (class token), "gap" (mean of the patch tokens), "map" (MAPHead over the patch
  # tokens), "flatten" (every token, concatenated).
  pool: str = "token"
  # "learned" (a table, class-token slot included) or "sincos2d" (big_vision's fixed
  # table, added to the patches only).
  posemb: str = "learned"
  num_registers: int = 0  # Register tokens (`registers`, 1 x R x D) after the class token.
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
  # The tanh form, as the published ViT (flax `nn.gelu`'s default) was trained with; the
  # Keras origin uses exact erf.
  gelu_approximate: bool = True
  zero_head_init: bool = True  # Zero head kernel, as the published ViT recipes.
  dtype: Dtype = jnp.float32  # Compute dtype; parameters are always float32.
  scan_layers: bool = False  # Params then stacked under Transformer/encoderblock.
  remat: bool = False
  kernels: str = "auto"  # "auto", "cpu" or "xla": see the module docstring.

  @nn.compact
  def __call__(self, images_BxHxWxC: Array, *, train: bool,
               return_intermediates: bool = False):
    self._check(images_BxHxWxC.shape)
    cpu = uses_cpu_kernels(self.kernels)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding")(images_BxHxWxC.astype(self.dtype))
    b, gh, gw, d = x.shape
    x_BxNxD = x.reshape(b, gh * gw, d)
    if self.posemb == "sincos2d":  # Before the class token, which gets none (big_vision).
      x_BxNxD = x_BxNxD + jnp.asarray(posemb_sincos2d(gh, gw, d), x_BxNxD.dtype)
    if self.class_token:
      cls_1x1xD = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
      x_BxNxD = jnp.concatenate(
          [jnp.broadcast_to(cls_1x1xD.astype(x_BxNxD.dtype), (b, 1, d)), x_BxNxD], axis=1)
    registers_1xRxD = None
    if self.num_registers:
      registers_1xRxD = self.param("registers", nn.initializers.normal(stddev=0.02),
                                   (1, self.num_registers, d), jnp.float32)
    block_kwargs = dict(
        num_heads=self.num_heads, head_dim=self.head_dim or self.width // self.num_heads,
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        residual_dropout=self.residual_dropout,
        mlp_activate_output=self.mlp_activate_output,
        gelu_approximate=self.gelu_approximate)
    x_BxTxD, weights = Encoder(
        self.depth, block_kwargs, self.dropout_rate, self.residual_dropout,
        self.stochastic_depth_rate, self.scan_layers, self.remat, self.dtype, cpu,
        learned_posemb=self.posemb == "learned", name="Transformer")(
            x_BxNxD, train, return_intermediates, registers_1xRxD, int(self.class_token))
    x_BxF = self._head_input(x_BxTxD, train, cpu)
    head_init = nn.initializers.zeros if self.zero_head_init else nn.initializers.lecun_normal()
    logits_BxK = _dense(self.num_classes, cpu=cpu, dtype=self.dtype, kernel_init=head_init,
                        name="head")(x_BxF).astype(jnp.float32)
    if return_intermediates:
      return logits_BxK, {"pre_logits": x_BxF.astype(jnp.float32),
                          "attention_weights": weights}
    return logits_BxK

  def _check(self, shape_BHWC: tuple[int, ...]) -> None:
    _, h, w, _ = shape_BHWC
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(
          f"Image size {h}x{w} is not divisible by the patch size {self.patch_size}: set "
          f"config.image_size to a multiple of {self.patch_size} (e.g. "
          f"{h // self.patch_size * self.patch_size or self.patch_size}).")
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r}: use one of {POOLS}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb={self.posemb!r}: use one of {POSEMBS}.")
    if self.pool == "token" and not self.class_token:
      raise ValueError("pool='token' needs class_token=True; use pool='gap', 'map' or "
                       "'flatten'.")

  def _head_input(self, x_BxTxD: Array, train: bool, cpu: bool) -> Array:
    """Pooling, dropout, the hidden head layers and pre_logits: what the head reads."""
    prefix = int(self.class_token) + self.num_registers  # Tokens before the patches.
    if self.pool == "token":
      x_BxF = x_BxTxD[:, 0]
    elif self.pool == "gap":
      x_BxF = x_BxTxD[:, prefix:].mean(axis=1)
    elif self.pool == "map":
      x_BxF = MAPHead(self.num_heads, self.mlp_dim, self.gelu_approximate, self.dtype, cpu,
                      name="MAPHead_0")(x_BxTxD[:, prefix:])
    else:
      x_BxF = x_BxTxD.reshape(x_BxTxD.shape[0], -1)
    x_BxF = _dropout(self, x_BxF, self.head_dropout_rate, train, cpu)
    for i, features in enumerate(self.head_hidden_dims):
      x_BxF = _gelu(_dense(features, cpu=cpu, dtype=self.dtype, name=f"head_hidden_{i}")(x_BxF),
                    self.gelu_approximate, cpu)
      x_BxF = _dropout(self, x_BxF, self.head_dropout_rate, train, cpu)
    if self.representation_size:
      x_BxF = jnp.tanh(_dense(self.representation_size, cpu=cpu, dtype=self.dtype,
                              name="pre_logits")(x_BxF))
    return x_BxF
