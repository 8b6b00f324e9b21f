"""`python -m vit_jax --config=cifar100 --workdir=DIR`: the command line of vit_jax/cli.py."""
from vit_jax import cli

cli.run()
