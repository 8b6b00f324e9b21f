"""vit_jax: Vision Transformers in JAX/Flax (train from scratch, fine-tune, scale)."""
