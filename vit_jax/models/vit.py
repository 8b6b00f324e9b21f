"""Vision Transformer (Flax linen); the named models are in `registry.py`.

Parameter names and shapes are those of the published ViT checkpoints
(`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_1,LayerNorm_2,MlpBlock_3}`,
`Transformer/encoder_norm`, `pre_logits`, `head`), so a published `.npz` maps onto the tree
key for key. Child names are given explicitly wherever a checkpoint depends on the path.
The variants add big_vision's names: `posemb="sincos2d"` computes its table (no
`posembed_input`), `pool="map"` adds `MAPHead_0` (`probe`, `MultiHeadDotProductAttention_0`,
`LayerNorm_0`, `MlpBlock_0`), `num_registers=R` adds `registers` (1 x R x D). Ours:
`stem_features=F` adds `stem` (a 3 x 3 x C x F kernel and its bias) and makes `embedding`
a Dense over each patch's features ((P*P*F) x D).

The model takes images that are already normalised (`vit_jax.data.augment.eval_preprocess`)
and returns float32 logits:

  model = create_model("ViT-B/16", num_classes=1000)
  variables = model.init(jax.random.key(0), images_BxHxWxC, train=False)
  logits_BxK = model.apply(variables, images_BxHxWxC, train=False)
  logits_BxK, extra = model.apply(variables, images_BxHxWxC, train=False,
                                  return_intermediates=True)
  extra["pre_logits"]         # B x F pooled features fed to the head
  extra["attention_weights"]  # tuple over layers of B x heads x tokens x tokens

`kernels` picks how the layers are computed ("auto", "cpu", "xla" or "cudnn": see
`layers.py`); every path has the same parameters and gives the same outputs to float
rounding.

Reduced precision (`dtype=bfloat16`): parameters, LayerNorm statistics, softmax, the
attention logits and the class logits are float32; the matmuls take bfloat16 inputs.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import parallel
from vit_jax.models import layers

Array = jax.Array
Dtype = Any


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
  kernels: str  # Resolved: "cpu", "xla" or "cudnn".

  @nn.compact
  def __call__(self, x_BxLxD: Array, drop_path_rate: Array | float, train: bool,
               return_weights: bool) -> tuple[Array, Array | None]:
    cpu = self.kernels == "cpu"
    y_BxLxD, weights = layers.SelfAttention(
        self.num_heads, self.head_dim, self.attention_dropout_rate, self.dtype, self.kernels,
        name="MultiHeadDotProductAttention_1")(
            layers.layer_norm("LayerNorm_0", self.dtype, cpu)(x_BxLxD), train, return_weights)
    if self.residual_dropout:
      y_BxLxD = layers.dropout(self, y_BxLxD, self.dropout_rate, train, cpu)
    x_BxLxD = x_BxLxD + layers.drop_path(self, y_BxLxD, drop_path_rate, train,
                                   self.drop_path_enabled)
    y_BxLxD = layers.MlpBlock(self.mlp_dim, self.dropout_rate, self.mlp_activate_output,
                       self.gelu_approximate, self.dtype, cpu, name="MlpBlock_3")(
                           layers.layer_norm("LayerNorm_2", self.dtype, cpu)(x_BxLxD), train)
    x_BxLxD = x_BxLxD + layers.drop_path(self, y_BxLxD, drop_path_rate, train,
                                   self.drop_path_enabled)
    return parallel.constrain_batch(x_BxLxD), weights


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
  kernels: str  # Resolved: "cpu", "xla" or "cudnn".
  learned_posemb: bool = True  # False: the caller added a fixed (sincos2d) embedding.

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool, return_weights: bool,
               registers_1xRxD: Array | None = None,
               registers_at: int = 0) -> tuple[Array, tuple[Array, ...]]:
    cpu = self.kernels == "cpu"
    if self.learned_posemb:
      x_BxLxD = AddPositionEmbedding(name="posembed_input")(x_BxLxD)
    if registers_1xRxD is not None:
      # Registers have no position (Darcet et al. 2023; timm): inserted after the table is
      # added, between the class token and the patches.
      registers_BxRxD = jnp.broadcast_to(registers_1xRxD.astype(x_BxLxD.dtype),
                                         (x_BxLxD.shape[0], *registers_1xRxD.shape[1:]))
      x_BxLxD = jnp.concatenate([x_BxLxD[:, :registers_at], registers_BxRxD,
                                 x_BxLxD[:, registers_at:]], axis=1)
    x_BxLxD = parallel.constrain_batch(x_BxLxD)
    if self.residual_dropout:
      x_BxLxD = layers.dropout(self, x_BxLxD, self.dropout_rate, train, cpu)
    # Stochastic depth grows linearly with depth (DeiT/timm): 0 at the first block.
    rates_L = np.linspace(0.0, self.stochastic_depth_rate, self.depth, dtype=np.float32)
    block_kwargs = dict(self.block_kwargs, dtype=self.dtype, kernels=self.kernels,
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
    x_BxLxD = layers.layer_norm("encoder_norm", self.dtype, cpu)(x_BxLxD)
    return parallel.constrain_batch(x_BxLxD), weights


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
  # Channels of a 3x3 convolution + GELU (`stem`) before the patch embedding, which is then
  # a Dense over each patch's P*P*F features; 0: none, as the published ViT. A locality
  # bias for training from scratch on small images (docs/fashion_mnist.md).
  stem_features: int = 0
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
  kernels: str = "auto"  # "auto", "cpu", "xla" or "cudnn": see the module docstring.

  @nn.compact
  def __call__(self, images_BxHxWxC: Array, *, train: bool,
               return_intermediates: bool = False):
    self._check(images_BxHxWxC.shape)
    head_dim = self.head_dim or self.width // self.num_heads
    kernels = layers.resolve_kernels(self.kernels, jax.default_backend(), self.dtype, head_dim)
    cpu = kernels == "cpu"
    x_BxNxD, gh, gw = self._embed(images_BxHxWxC.astype(self.dtype), cpu)
    b, _, d = x_BxNxD.shape
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
        num_heads=self.num_heads, head_dim=head_dim,
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        residual_dropout=self.residual_dropout,
        mlp_activate_output=self.mlp_activate_output,
        gelu_approximate=self.gelu_approximate)
    x_BxTxD, weights = Encoder(
        self.depth, block_kwargs, self.dropout_rate, self.residual_dropout,
        self.stochastic_depth_rate, self.scan_layers, self.remat, self.dtype, kernels,
        learned_posemb=self.posemb == "learned", name="Transformer")(
            x_BxNxD, train, return_intermediates, registers_1xRxD, int(self.class_token))
    x_BxF = self._head_input(x_BxTxD, train, cpu)
    head_init = nn.initializers.zeros if self.zero_head_init else nn.initializers.lecun_normal()
    if jnp.dtype(self.dtype) == jnp.float32:
      head = layers.dense(self.num_classes, cpu=cpu, dtype=self.dtype, kernel_init=head_init,
                    name="head")
    else:  # Reduced precision: the logits are accumulated in float32.
      head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=head_init, name="head",
                      dot_general=functools.partial(jax.lax.dot_general,
                                                    preferred_element_type=jnp.float32))
    logits_BxK = head(x_BxF).astype(jnp.float32)
    if return_intermediates:
      return logits_BxK, {"pre_logits": x_BxF.astype(jnp.float32),
                          "attention_weights": weights}
    return logits_BxK

  def _embed(self, x_BxHxWxC: Array, cpu: bool) -> tuple[Array, int, int]:
    """Patch tokens B x N x D, and the patch grid's height and width."""
    gh, gw = x_BxHxWxC.shape[1] // self.patch_size, x_BxHxWxC.shape[2] // self.patch_size
    if self.stem_features:
      x_BxNxE = layers.ConvStem(self.stem_features, self.patch_size, self.gelu_approximate,
                                self.dtype, cpu, name="stem")(x_BxHxWxC)
      return layers.dense(self.width, cpu=cpu, dtype=self.dtype,
                          name="embedding")(x_BxNxE), gh, gw
    x_BxGxGxD = nn.Conv(self.width, (self.patch_size, self.patch_size),
                        strides=(self.patch_size, self.patch_size), padding="VALID",
                        dtype=self.dtype, name="embedding")(x_BxHxWxC)
    return x_BxGxGxD.reshape(x_BxGxGxD.shape[0], gh * gw, self.width), gh, gw

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
      x_BxF = layers.MAPHead(self.num_heads, self.mlp_dim, self.gelu_approximate,
                             self.dtype, cpu, name="MAPHead_0")(x_BxTxD[:, prefix:])
    else:
      x_BxF = x_BxTxD.reshape(x_BxTxD.shape[0], -1)
    x_BxF = layers.dropout(self, x_BxF, self.head_dropout_rate, train, cpu)
    for i, features in enumerate(self.head_hidden_dims):
      hidden = layers.dense(features, cpu=cpu, dtype=self.dtype, name=f"head_hidden_{i}")
      x_BxF = layers.gelu(hidden(x_BxF), self.gelu_approximate, cpu)
      x_BxF = layers.dropout(self, x_BxF, self.head_dropout_rate, train, cpu)
    if self.representation_size:
      x_BxF = jnp.tanh(layers.dense(self.representation_size, cpu=cpu, dtype=self.dtype,
                              name="pre_logits")(x_BxF))
    return x_BxF
