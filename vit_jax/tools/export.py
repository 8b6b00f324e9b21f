"""--mode=export: a checkpoint of ours as a published-format .npz (layout (a) of
`vit_jax.models.convert`), which timm's and vision_transformer's loaders read.

  python main.py --mode=export --workdir=DIR --output=PATH.npz [--checkpoint=latest]

DIR and PATH.npz may be on an object store (gs://BUCKET/...): see `vit_jax.paths`.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vit_jax import paths
from vit_jax.models import convert
from vit_jax.train import checkpoints


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
  return step_dir
