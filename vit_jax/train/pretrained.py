"""Fine-tuning: a fresh model's parameters filled from `config.init_from`.

`config.init_from` names one of:
  * a workdir of ours (with best/ or checkpoints/): its best checkpoint, else its latest;
  * one of our checkpoint step folders (WORKDIR/checkpoints/<step> or WORKDIR/best/<step>),
    or WORKDIR/checkpoints (WORKDIR/best) itself: its newest step;
  * a `.npz` in one of the published ViT layouts (`vit_jax.models.convert`);
  * a published checkpoint by name ("augreg:ViT-B/16", `vit_jax.models.hub.CHECKPOINTS`) or
    by http(s):// URL: downloaded once into `config.init_cache_dir`;
  * any of the first three on an object store (gs://BUCKET/PATH, `vit_jax.paths`): read
    from there with the machine's credentials, each time (no cache).
Only parameters are read: the optimiser state, step, RNG and data position start fresh.
How the file's arrays are matched to the model (new head, resampled position embedding,
...) is `convert.match`'s; the report says what was loaded, re-initialised and unused.

  params, report = pretrained.load_params(config, params)   # report.to_dict() for logs
  params = pretrained.load_into(config, params)             # prints the report
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vit_jax import errors, paths
from vit_jax.models import convert, hub
from vit_jax.train import checkpoints

PyTree = Any


def read_arrays(path: str, cache_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """Flat arrays of `path` (a .npz, a workdir, a step folder, or a published checkpoint's
  name or URL, fetched into `cache_dir`), and what was read."""
  if hub.is_name(path) or hub.is_url(path):
    local = hub.resolve(path, cache_dir)
    return convert.read_npz(local), f"{path} ({local})"
  if paths.isfile(path):
    return convert.read_npz(path), f"{path} (.npz)"
  if paths.isdir(path):
    step_dir = checkpoints.checkpoint_dir(path)
    return checkpoints.read_checkpoint_params(step_dir), f"{step_dir} (our checkpoint)"
  raise errors.MissingCheckpointError(f"config.init_from={path!r} does not exist.")


def load_params(config: ml_collections.ConfigDict,
                params: PyTree) -> tuple[PyTree, convert.LoadReport]:
  """`params` (a freshly initialised model) with values from `config.init_from`.

  Args:
    config: a validated config; `init_from`, `init_cache_dir`, `init_head` and
      `init_pre_logits` are read.
    params: the model's parameters, e.g. `TrainState.params` (any sharding).

  Returns:
    The new params (same tree, shardings and dtypes) and a `convert.LoadReport`.

  Raises:
    errors.MissingCheckpointError / NotACheckpointError for a path that is not a
    checkpoint; errors.CheckpointDownloadError for a name or URL that cannot be fetched;
    errors.CheckpointMismatchError for missing parameters or shapes that cannot be adapted.
  """
  flat, what = read_arrays(config.init_from, config.init_cache_dir)
  return convert.match(flat, params, init_head=config.init_head,
                       init_pre_logits=config.init_pre_logits, source=what)


def load_into(config: ml_collections.ConfigDict, params: PyTree) -> PyTree:
  """`load_params`, with the report printed and logged."""
  new_params, report = load_params(config, params)
  text = report.format()
  logging.info("%s", text)
  if jax.process_index() == 0:
    print(text, flush=True)
  return new_params
