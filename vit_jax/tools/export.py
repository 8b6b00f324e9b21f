"""--mode=export: a checkpoint of ours as a published-format .npz (layout (a) of
`vit_jax.models.convert`), which timm's and vision_transformer's loaders read.

  python main.py --mode=export --workdir=DIR --output=PATH.npz [--checkpoint=latest]

DIR and PATH.npz may be on an object store (gs://BUCKET/...): see `vit_jax.paths`.
vit_jax reads any export back as it was (config.init_from); a run whose model or input
normalisation the published loaders do not build gets a warning naming what they lack.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from vit_jax import config as config_lib, errors, paths
from vit_jax.models import convert
from vit_jax.train import checkpoints, workdir as workdir_lib


def export_npz(params: Any, path: str) -> int:
  """Writes params as a published-format .npz, atomically (a local rename or one object
  upload); returns the array count."""
  arrays = convert.published_arrays(params)
  if jax.process_index() == 0:  # Every process gathers (a collective); one writes.
    with paths.atomic_file(path) as tmp:
      # A file object, because np.savez appends ".npz" to names that lack it.
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
  return len(arrays)


def export_workdir(workdir: str, path: str, which: str = "best") -> str:
  """Exports a workdir's best (else latest) or latest checkpoint; returns the step folder.

  Args:
    workdir: a training workdir (or one of its checkpoint folders).
    path: the .npz file to write.
    which: "best" (falling back to the latest when the run has no best) or "latest".
  """
  step_dir = checkpoints.checkpoint_dir(workdir, which)
  count = export_npz(checkpoints.read_checkpoint_params(step_dir), path)
  print(f"Exported {count} arrays of {step_dir} to {path}.", flush=True)
  try:
    lacking = beyond_published_loaders(workdir_lib.load_config(workdir))
  except errors.NoRunError:  # A checkpoint folder given alone: no config to check.
    lacking = []
  if lacking and jax.process_index() == 0:
    print(f"WARNING: timm and vision_transformer will not rebuild this model from {path}: "
          f"{'; '.join(lacking)}. vit_jax reads it back as it is (config.init_from).",
          flush=True)
  return step_dir


# Model fields that add what the published loaders do not build: (field, what, who lacks it).
_BEYOND_THE_LOADERS = (
    ("stem_features", "a convolutional stem", "neither has one"),
    ("head_hidden_dims", "hidden head layers", "neither has them"),
    ("mlp_activate_output", "GELU after each block's second MLP layer", "neither has it"),
    ("num_registers", "register tokens", "timm's reader skips them, vision_transformer has "
     "none"),
    ("representation_size", "a pre_logits layer", "timm has none"),
)


def _shown(value) -> str:
  return repr(tuple(value) if isinstance(value, list) else value)


def beyond_published_loaders(config: ml_collections.ConfigDict) -> list[str]:
  """What of `config`'s model and input the published ViT loaders (timm's
  `_load_weights`, vision_transformer's models_vit) do not build, one phrase each."""
  fields = config_lib.model_fields(config)
  lacking = [f"{what} ({name}={_shown(fields[name])}): {who}"
             for name, what, who in _BEYOND_THE_LOADERS if fields[name]]
  if fields["pool"] == "flatten":
    lacking.append("a head on all tokens flattened (pool='flatten'): neither has one")
  if config.aug.normalize != "minus_one_one":
    statistics = ("the training set's mean and std, in run.json"
                  if config.aug.normalize == "dataset" else "ImageNet's mean and std")
    lacking.append(f"inputs normalised with aug.normalize={config.aug.normalize!r} "
                   f"({statistics}), where the published models take [-1, 1]")
  return lacking
