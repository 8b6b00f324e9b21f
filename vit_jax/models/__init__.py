"""The ViT model: `vit` (the model), `layers` (its layers, computed as the `kernels` switch
picks), `cpu_kernels` (the CPU layers), `registry` (named models), `convert` (published
checkpoint layouts) and `hub` (published checkpoints by name or URL, downloaded once into
a cache)."""
from vit_jax.models.registry import (ModelSpec, count_params, create_model, get_spec,
                                     list_models)
from vit_jax.models.layers import KERNELS, cudnn_attention_problem, resolve_kernels
from vit_jax.models.vit import POOLS, POSEMBS, VisionTransformer

__all__ = ["KERNELS", "POOLS", "POSEMBS", "ModelSpec", "VisionTransformer", "count_params",
           "create_model", "cudnn_attention_problem", "get_spec", "list_models",
           "resolve_kernels"]
