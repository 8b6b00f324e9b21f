r"""vit_jax command line: train, eval, predict, visualize, export, bench.

  python main.py --config=configs/cifar100.py --workdir=workdirs/cifar100
  python main.py --mode=eval --config=configs/cifar100.py --workdir=workdirs/cifar100

The same as `python -m vit_jax` and the `vit_jax` console script: see vit_jax/cli.py.
"""
from vit_jax import cli

if __name__ == "__main__":
  cli.run()
