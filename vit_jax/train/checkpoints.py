"""Orbax checkpoints of a training run: the latest K and the best, with the data state.

Layout in the workdir:
  checkpoints/<step>/{state,data,meta}   the latest `keep` checkpoints
  best/<step>/{state,data,meta}          the best one by `config.best_metric`
`state` holds params, optimiser state, step and RNG; `data` the input iterator's state
(JSON); `meta` the step, a checksum of every array of `state`, and what the caller adds
(the best metric's name and value; the training metrics not yet logged).

What can go wrong, and what happens:
- A crash or SIGKILL mid-save: orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp`
  and renames it when complete, so the previous checkpoints stay intact and no
  half-written one is taken for good; the leftover folder is deleted at the next start.
  On an object store (gs://), where a rename is a copy, orbax writes `<step>/` in place and
  marks it complete with `<step>/commit_success.txt` last: a step without it is not taken.
- A damaged checkpoint (truncated, garbled or missing file): `restore` names it and the
  error on the console, and falls back to the one before. Orbax does not notice every
  garbled byte of array data (it has no checksums), so `save` stores a checksum of
  each array in `meta` and `restore` compares them: a mismatch counts as unreadable.
- No readable checkpoint left: `UnreadableCheckpointError` names the folder and what
  to do.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from logging import Filter, LogRecord, getLogger
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_jax import errors, parallel, paths
from vit_jax.models import convert


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict
  meta: dict


def _manager(path: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      # Orbax takes absolute paths only: a local path made absolute, a URL kept.
      paths.absolute(path), options=ocp.CheckpointManagerOptions(
          # The folder is made by the first save (`CheckpointStore._save`): opening a
          # workdir to look for checkpoints changes nothing in it.
          max_to_keep=keep, create=False, enable_async_checkpointing=False,
          # Leftovers of a save killed midway are removed at start-up.
          cleanup_tmp_directories=True),
      item_names=("state", "data", "meta"))


# --- Checksums --------------------------------------------------------------------------


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums over the bits of `x`, each element weighted by an odd number.

  Any single flipped bit changes both; the sums wrap around in integer arithmetic, so
  they do not depend on the order of summation, i.e. on how `x` is sharded.
  """
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  u = jax.lax.bitcast_convert_type(x, bits).ravel().astype(jnp.uint32)
  i = jnp.arange(u.size, dtype=jnp.uint32)
  first = jnp.sum(u * (2 * i + 1), dtype=jnp.uint32)
  second = jnp.sum((u ^ (u >> 15)) * ((i * jnp.uint32(0x9E3779B1)) | 1), dtype=jnp.uint32)
  return jnp.stack([first, second])


@functools.lru_cache(maxsize=4)
def _checksum_fn(mesh: Mesh | None):
  # Replicated results, so that every process of a multi-host run can read them.
  out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  return jax.jit(lambda arrays: [_leaf_checksum(x) for x in arrays], out_shardings=out)


def checksums(tree) -> dict[str, list[int]]:
  """{"params/.../kernel": [sum1, sum2], ...} over every array of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = [jnp.asarray(leaf) for _, leaf in leaves]
  meshes = [a.sharding.mesh for a in arrays if isinstance(a.sharding, NamedSharding)]
  sums = jax.device_get(_checksum_fn(meshes[0] if meshes else None)(arrays))
  return {_path_name(path): [int(v) for v in np.asarray(s)]
          for (path, _), s in zip(leaves, sums)}


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _verify(state, expected: dict[str, list[int]] | None) -> None:
  if not expected:  # Checkpoints written before checksums were stored.
    return
  actual = checksums(state)
  bad = sorted(name for name, value in actual.items() if expected.get(name) != value)
  if bad:
    raise ValueError(f"{len(bad)} array(s) do not match the checksums saved with them "
                     f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the "
                     "files were damaged after writing")


def _leaf_specs(tree) -> dict[str, str]:
  """"path" -> "shape dtype" of every array, paths alike for a TrainState and orbax's
  metadata of it (attributes, dict keys and sequence indices all become path parts)."""
  specs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = (getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)
    specs["/".join(map(str, parts))] = f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"
  return specs


def state_differences(stored_tree, abstract_state) -> list[str]:
  """How the arrays a checkpoint holds differ from those `abstract_state` asks for."""
  stored, wanted = _leaf_specs(stored_tree), _leaf_specs(abstract_state)
  return sorted([f"{k} is not in the checkpoint" for k in wanted.keys() - stored.keys()]
                + [f"{k} is only in the checkpoint" for k in stored.keys() - wanted.keys()]
                + [f"{k} is {stored[k]} in the checkpoint, {wanted[k]} now"
                   for k in stored.keys() & wanted.keys() if stored[k] != wanted[k]])


def _reason(error: BaseException) -> str:
  """"Type: first line" of the innermost cause: orbax wraps the telling TensorStore error
  (e.g. "DATA_LOSS: ... Error reading ...") in a generic one that dumps a whole spec."""
  chain = [error]
  while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  inner = chain[-1]
  line = (str(inner).strip().splitlines() or [""])[0]
  return f"{type(inner).__name__}: {line[:300]}{'...' if len(line) > 300 else ''}"


# --- The store ------------------------------------------------------------------------------


# Orbax restores every array concurrently on an event loop of its own. When one read fails,
# it raises and closes that loop while TensorStore is still reading the other arrays; each
# of those then reports into the closed loop: a "RuntimeError: Event loop is closed"
# traceback (an unraisable exception), or an asyncio "Future/Task exception was never
# retrieved" error with a whole TensorStore spec when that read failed too; a metadata
# read not yet started is a "coroutine ... was never awaited" warning. All repeat the one
# failure `restore` reports in a line, dozens of times over, so they are dropped.
# The filters go in before a restore, not after it fails: the loop closes, and the first
# of those reports can arrive, before orbax's exception reaches `restore`.


def _is_abandoned_read_callback(unraisable) -> bool:
  """A read finishing into orbax's closed event loop: its callback raises this."""
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _AbandonedFailedReads(Filter):
  """Drops asyncio's "never retrieved" errors of reads from the checkpoint folders given."""

  def __init__(self):
    super().__init__()
    self.folders: set[str] = set()

  def filter(self, record: LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith(("Future exception was never retrieved",
                                    "Task exception was never retrieved"))
                and any(folder in message for folder in self.folders))


_ABANDONED_FAILED_READS = _AbandonedFailedReads()


def _silence_abandoned_reads(folder: str) -> None:
  """Keeps the reports of reads abandoned in `folder` off the console; every other
  unraisable exception, asyncio error and warning still gets through. Idempotent."""
  warnings.filterwarnings("ignore", r"coroutine 'Store\._get_array_metadatas' was never awaited",
                          RuntimeWarning)
  _ABANDONED_FAILED_READS.folders.add(folder)
  asyncio_logger = getLogger("asyncio")
  if _ABANDONED_FAILED_READS not in asyncio_logger.filters:
    asyncio_logger.addFilter(_ABANDONED_FAILED_READS)
  previous = sys.unraisablehook
  if getattr(previous, "_drops_abandoned_reads", False):
    return

  def hook(unraisable) -> None:
    if not _is_abandoned_read_callback(unraisable):
      previous(unraisable)

  hook._drops_abandoned_reads = True
  sys.unraisablehook = hook


class CheckpointStore:
  """Saves and restores the latest-K and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int):
    self.latest = _manager(paths.join(workdir, "checkpoints"), keep)
    self.best = _manager(paths.join(workdir, "best"), 1)

  @staticmethod
  def _save(manager: ocp.CheckpointManager, step: int, state, data_state: dict,
            meta: dict) -> None:
    if step in manager.all_steps():
      # Left by a run that got further before it crashed, or unreadable (restore went
      # past it): this run has just recomputed the step, so its state replaces it.
      manager.delete(step)
    meta = {"step": step, **meta, "checksums": checksums(state)}
    paths.makedirs(str(manager.directory))  # Object stores have no folders to make.
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    self._save(self.latest, step, state, data_state, meta)

  def save_best(self, step: int, state, data_state: dict, meta: dict) -> None:
    self._save(self.best, step, state, data_state, meta)

  def discard_best_after(self, step: int) -> None:
    """Drops best checkpoints past `step`: a resumed run re-evaluates those steps."""
    for later in [s for s in self.best.all_steps() if s > step]:
      self.best.delete(later)

  def best_meta(self) -> dict | None:
    """The best checkpoint's meta (metric name and value), or None before the first."""
    step = self.best.latest_step()
    if step is None:
      return None
    return self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state, which: str = "latest") -> Restored | None:
    """The newest readable checkpoint of `which` ("latest" or "best"), or None if none.

    `abstract_state` carries the target shardings, so a run saved on one device count
    restores onto another. Unreadable checkpoints are reported and skipped. Every process
    of a multi-host run takes the same one: a checkpoint that one process cannot read
    (damage in the shards it reads, a read that failed) is skipped by all.
    """
    manager = {"latest": self.latest, "best": self.best}[which]
    steps = sorted(manager.all_steps(), reverse=True)
    _silence_abandoned_reads(str(manager.directory))
    for i, step in enumerate(steps):
      path = paths.join(str(manager.directory), str(step))
      self._check_structure(path, abstract_state)
      error = None
      try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        _verify(out["state"], out["meta"].get("checksums"))
      except Exception as e:  # Orbax raises many types for damaged files.  # noqa: BLE001
        error = e
      failed = parallel.processes_where_not(error is None)
      if failed:
        later = (f"falling back to step {steps[i + 1]}" if i + 1 < len(steps)
                 else "no older checkpoint to fall back to")
        if error is not None:
          # The console gets one line; orbax's whole error (it can dump a TensorStore spec
          # per array) only where INFO logs are wanted (main.py --verbosity=0).
          logging.info("Checkpoint %s is unreadable (%s: %s); %s.", path,
                       type(error).__name__, str(error)[:2000], later)
        if jax.process_index() == 0:
          reason = (_reason(error) if error is not None
                    else f"on process(es) {', '.join(map(str, failed))}")
          print(f"WARNING: checkpoint {path} is unreadable ({reason}); {later}.", flush=True)
        continue
      meta = {k: v for k, v in dict(out["meta"]).items() if k != "checksums"}
      return Restored(step, out["state"], dict(out["data"]), meta)
    if steps:
      raise errors.UnreadableCheckpointError(
          f"No readable checkpoint in {manager.directory} (tried steps "
          f"{', '.join(map(str, steps))}; the reasons are printed above). Restore the "
          "folder from a backup, or move it away (or pass --start_over, which deletes "
          "the run's checkpoints and logs) to train from scratch.")
    return None

  @staticmethod
  def _check_structure(path: str, abstract_state) -> None:
    """Raises StateMismatchError if the checkpoint's own metadata describes other arrays.

    Without this, orbax's "tree structures do not match" or "requested shape is not
    compatible" (and a changed dtype, caught by the checksums) read as damage: the run
    fell back through every intact checkpoint and suggested deleting them.
    """
    handler = ocp.StandardCheckpointHandler()  # What saved "state": reads its metadata.
    try:
      stored = handler.metadata(epath.Path(path) / "state").tree
    except Exception:  # Unreadable metadata is damage: the restore reports it.  # noqa: BLE001
      return
    finally:
      handler.close()
    differences = state_differences(stored, abstract_state)
    if differences:
      shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
      raise errors.StateMismatchError(
          f"Checkpoint {path} is intact but holds another train state than this config "
          f"builds ({len(differences)} difference(s): {shown}): a setting it depends on "
          "changed (optimiser, clipping, layer-wise lr, frozen backbone, EMA, model "
          "overrides, scan_layers, dtypes). Rerun with the settings the run was trained "
          "with, or train into another --workdir.")

  def close(self) -> None:
    for manager in (self.latest, self.best):
      # Orbax's close() does not wait for the clean-up of unfinished checkpoints that the
      # manager starts in a thread when created: a process that exits meanwhile (a refused
      # start) gets a traceback from that thread after its one-line error.
      getattr(manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
      manager.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array goes."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# --- A checkpoint's parameters alone (fine-tuning, export) ------------------------------


def _steps(folder: str) -> list[int]:
  """Completed step folders: orbax's unfinished temporaries carry a non-numeric suffix; on
  an object store, an unfinished step lacks its commit_success.txt."""
  steps = sorted(int(name) for name in paths.listdir(folder) if name.isdigit())
  if paths.is_remote(folder):
    steps = [s for s in steps
             if ocp.step.is_path_finalized(epath.Path(paths.join(folder, str(s))))]
  return steps


def checkpoint_dir(path: str, which: str = "best") -> str:
  """The step folder `path` names: itself, the newest in a folder of steps, or a workdir's
  newest best/latest checkpoint.

  `which="best"` falls back to the latest checkpoint when the run has no best one.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: use 'best' or 'latest'.")
  if paths.isdir(paths.join(path, "state")):
    return path
  if _steps(path):  # WORKDIR/checkpoints or WORKDIR/best itself.
    return paths.join(path, str(_steps(path)[-1]))
  for kind in ((which, "latest") if which == "best" else (which,)):
    folder = paths.join(path, "best" if kind == "best" else "checkpoints")
    steps = _steps(folder)
    if steps:
      if kind != which:
        print(f"No best checkpoint in {path}: using the latest one.", flush=True)
      return paths.join(folder, str(steps[-1]))
  raise errors.MissingCheckpointError(
      f"{path} holds no checkpoint: expected a workdir with best/<step> or "
      "checkpoints/<step>, a step folder with state/, or a published-format .npz file.")


def read_checkpoint_params(step_dir: str) -> dict[str, np.ndarray]:
  """The params of one of our checkpoints as host arrays, flat, without its optimiser state:
  the EMA weights when the run kept them (`ema_params`, the model it delivers), else the
  raw ones.

  A partial restore of that subtree: the optimiser's structure (which depends on the config
  that trained it) is never needed.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    path = epath.Path(paths.absolute(step_dir)) / "state"
    tree = handler.metadata(path).tree
    if "params" not in tree:
      raise errors.NotACheckpointError(
          f"{path} has no 'params' entry (found {sorted(tree)}): not a vit_jax training "
          "checkpoint.")
    key = "ema_params" if "ema_params" in tree else "params"
    item = {key: tree[key]}
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=as_numpy, partial_restore=True))
  finally:
    handler.close()
  return convert.flatten(restored[key])
