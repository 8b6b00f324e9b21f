"""The files that make a workdir self-describing: config.json and run.json.

`config.json` is the resolved config; `run.json` what the data told the run (class
names, stored image shape, the training set's channel mean/std). Evaluation, prediction
and visualisation need nothing but the workdir because of them. Resuming into a workdir
that holds another model or dataset is refused: it would mix two runs' checkpoints.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from vit_jax import errors

# What must match for a rerun in the same workdir to resume the run found there.
IDENTITY_KEYS = ("dataset", "model.name", "image_size")


class WorkdirMismatchError(errors.UserError, ValueError):
  pass


def _get(config: dict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _atomic_write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_workdir(workdir: str, config: ml_collections.ConfigDict, num_classes: int) -> None:
  """Refuses a workdir that holds a run of another model or dataset."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return
  old, new = load_config_dict(workdir), json.loads(config.to_json_best_effort())
  diffs = [f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in IDENTITY_KEYS
           if _get(old, k) != _get(new, k)]
  old_classes = load_run(workdir)["num_classes"]
  if old_classes != num_classes:
    diffs.append(f"num_classes: {old_classes} -> {num_classes}")
  if diffs:
    raise WorkdirMismatchError(
        f"Workdir {workdir} holds a run of a different model or dataset "
        f"({'; '.join(diffs)}). Use another --workdir, or pass --start_over to delete "
        "its checkpoints and train from scratch.")


def changed_settings(workdir: str, config: ml_collections.ConfigDict,
                     prefixes: tuple[str, ...] = ("",)) -> str:
  """A sentence listing "key: saved -> now" for each config value under `prefixes` that
  differs from the workdir's config.json (for errors about checkpoints the config no longer
  fits); keys the saved file lacks (added to vit_jax since) are left out."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return "The workdir has no config.json to compare the settings with."
  def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
      out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                 else {f"{prefix}{key}": value})
    return out
  old = flat(load_config_dict(workdir))
  new = flat(json.loads(config.to_json_best_effort()))
  changed = [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
             if k.startswith(prefixes) and old[k] != new.get(k)]
  return f"Settings changed since the run's config.json: {'; '.join(changed) or 'none'}."


def write_run_files(workdir: str, config: ml_collections.ConfigDict, *, class_names,
                    image_shape, mean_C: np.ndarray, std_C: np.ndarray) -> None:
  """config.json and run.json: what eval, predict, export and a resumed run read back."""
  run = {"class_names": list(class_names), "num_classes": len(class_names),
         "image_shape": list(image_shape), "mean": np.asarray(mean_C).tolist(),
         "std": np.asarray(std_C).tolist()}
  if jax.process_index() == 0:
    _atomic_write_json(os.path.join(workdir, "config.json"),
                       json.loads(config.to_json_best_effort()))
    _atomic_write_json(os.path.join(workdir, "run.json"), run)


class NoRunError(errors.UserError, FileNotFoundError):
  """The workdir holds no training run, or not yet what was asked for: train first."""


def _run_file(workdir: str, name: str) -> str:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise NoRunError(f"{path} not found: {workdir} is not a vit_jax training workdir (train "
                     "into it with main.py --mode=train first).")
  return path


def load_config_dict(workdir: str) -> dict:
  with open(_run_file(workdir, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(load_config_dict(workdir))


def load_run(workdir: str) -> dict:
  with open(_run_file(workdir, "run.json"), encoding="utf-8") as f:
    return json.load(f)
