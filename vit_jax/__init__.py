"""vit_jax: Vision Transformers in JAX/Flax that train from scratch, fine-tune and scale.

Packages, top to bottom (a module imports only from its own floor or below):
  cli                      the command line (main.py, `python -m vit_jax`, `vit_jax`)
  tools/                   the other modes: evaluate, predict, visualize, export, bench
  train/                   the training loop and what it is made of
  config                   the config schema: every key, validation, steps from epochs
  data/, models/           the input pipeline; the ViT and its checkpoint layouts
  parallel, host_memory    mesh and shardings; process-level memory settings
  errors                   every error a user can fix
Recipes are configs/*.py, installed as vit_jax.configs.
"""
__version__ = "0.1.0"
