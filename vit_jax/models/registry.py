"""The registry of named ViTs: `create_model(name, num_classes=..., **overrides)`.

Each entry is a set of `vit.VisionTransformer` fields and the resolution the model is meant
for; any field can be overridden (`config.model.overrides.*`).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.vit import VisionTransformer


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
    # The shape-optimised 400M ViT of SigLIP (Alabdulmohsin et al. 2023; big_vision
    # "So400m"): MAP head, no class token, as its image towers.
    "ViT-So400m/14": _vit(1152, 27, 16, 4304, patch=14, image_size=224, class_token=False,
                          pool="map"),
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
  """The registered model names."""
  return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
  """The registry entry of `name` (its fields and intended resolution)."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}. Registered models: {', '.join(_REGISTRY)}.")
  return _REGISTRY[name]


def create_model(name: str, *, num_classes: int, **overrides) -> VisionTransformer:
  """A registered ViT.

  Args:
    name: a registered model (`list_models()`), e.g. "ViT-B/16" or "keras-example".
    num_classes: the head's outputs.
    **overrides: any other VisionTransformer field, e.g. depth=6, dtype="bfloat16",
      kernels="xla".

  Returns:
    The linen module; `model.init(key, images_BxHxWxC, train=False)` makes its parameters.

  Raises:
    ValueError naming an unknown model or field.
  """
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
