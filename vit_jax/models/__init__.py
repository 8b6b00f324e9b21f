"""The ViT model: `vit` (linen modules), `registry` (named models), `cpu_kernels` (the CPU
layers behind the `kernels` switch), `convert` (published checkpoint layouts) and `hub`
(published checkpoints by name or URL, downloaded once into a cache)."""
from vit_jax.models.registry import (ModelSpec, count_params, create_model, get_spec,
                                     list_models)
from vit_jax.models.vit import KERNELS, POOLS, POSEMBS, VisionTransformer, uses_cpu_kernels

__all__ = ["KERNELS", "POOLS", "POSEMBS", "ModelSpec", "VisionTransformer", "count_params",
           "create_model", "get_spec", "list_models", "uses_cpu_kernels"]
