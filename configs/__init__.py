"""The recipes: one ml_collections config per file, `get_config(arg)` each.

Installed as the package `vit_jax.configs`, so they are found by name from anywhere
(`python -m vit_jax --config=cifar100`) as well as by path (`--config=configs/cifar100.py`).
"""
