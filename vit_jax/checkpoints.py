"""Orbax checkpoints of a training run: the latest K and the best, with the data state.

Layout in the workdir:
  checkpoints/<step>/{state,data,meta}   the latest `keep` checkpoints
  best/<step>/{state,data,meta}          the best one by `config.best_metric`
`state` holds params, optimiser state, step and RNG; `data` the input iterator's state
(JSON); `meta` the step, and the best metric's name and value.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so
a crash mid-save leaves the previous checkpoints intact and no half-written one is taken
for good. A checkpoint that cannot be read is reported and skipped for the one before.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict
  meta: dict


def _manager(path: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(path), options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=False,
          # Leftovers of a save killed midway are removed at start-up.
          cleanup_tmp_directories=True),
      item_names=("state", "data", "meta"))


class CheckpointStore:
  """Saves and restores the latest-K and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int):
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep)
    self.best = _manager(os.path.join(workdir, "best"), 1)

  @staticmethod
  def _save(manager: ocp.CheckpointManager, step: int, state, data_state: dict,
            meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({"step": step, **meta})), force=True)
    manager.wait_until_finished()

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    if step not in self.latest.all_steps():
      self._save(self.latest, step, state, data_state, meta)

  def save_best(self, step: int, state, data_state: dict, meta: dict) -> None:
    if step not in self.best.all_steps():
      self._save(self.best, step, state, data_state, meta)

  def best_meta(self) -> dict | None:
    """The best checkpoint's meta (metric name and value), or None before the first."""
    step = self.best.latest_step()
    if step is None:
      return None
    return self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state, which: str = "latest") -> Restored | None:
    """The newest readable checkpoint of `which` ("latest" or "best"), or None if none.

    `abstract_state` carries the target shardings, so a run saved on one device count
    restores onto another.
    """
    manager = {"latest": self.latest, "best": self.best}[which]
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # Orbax raises many types for damaged files.  # noqa: BLE001
        path = os.path.join(str(manager.directory), str(step))
        later = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
        logging.error("Checkpoint %s is unreadable (%s: %s); %s.", path, type(e).__name__,
                      str(e).splitlines()[0][:300] if str(e) else "", later)
        print(f"WARNING: checkpoint {path} is unreadable ({type(e).__name__}); {later}.",
              flush=True)
        continue
      return Restored(step, out["state"], dict(out["data"]), dict(out["meta"]))
    if steps:
      raise RuntimeError(
          f"No readable checkpoint in {manager.directory} (tried steps {steps}). Move the "
          "folder away to start over, or restore it from a backup.")
    return None

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array goes."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
