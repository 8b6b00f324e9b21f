"""The ViT model: `vit` (linen modules and the registry), `cpu_kernels` (the CPU layers
behind the `kernels` switch) and `convert` (published checkpoint layouts)."""
from vit_jax.models.vit import (KERNELS, ModelSpec, VisionTransformer, count_params,
                                create_model, cudnn_attention_problem, get_spec, list_models,
                                resolve_kernels)

__all__ = ["KERNELS", "ModelSpec", "VisionTransformer", "count_params", "create_model",
           "cudnn_attention_problem", "get_spec", "list_models", "resolve_kernels"]
