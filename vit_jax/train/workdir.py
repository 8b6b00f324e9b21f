"""A training workdir: the files that make it self-describing, and loading what it trained.

`config.json` is the resolved config; `run.json` what the data told the run (class
names, stored image shape, the training set's channel mean/std). Evaluation, prediction,
visualisation and export need nothing but the workdir because of them (`load_trained`).
Resuming into a workdir that holds another model or dataset is refused: it would mix two
runs' checkpoints. `start_over` deletes a run's files and nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vit_jax import errors, models, parallel, paths
from vit_jax.train import checkpoints, optim, state as state_lib

# What must match for a rerun in the same workdir to resume the run found there.
IDENTITY_KEYS = ("dataset", "model.name", "image_size")
# What a run writes into its workdir: `start_over` deletes these and nothing else.
RUN_ENTRIES = ("checkpoints", "best", "tensorboard", "pictures", "metrics.jsonl",
               "config.json", "run.json", "final_metrics.json", "eval_per_class.json")


def _get(config: dict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _atomic_write_json(path: str, obj) -> None:
  paths.write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def check_folder(workdir: str) -> None:
  """Refuses a workdir path that is a file (a new folder or an existing one is fine)."""
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise errors.NotAFolderError(
        f"Workdir {workdir} is a file, not a folder: pass a folder (a new one is created) "
        "as --workdir.")


def check_workdir(workdir: str, config: ml_collections.ConfigDict, num_classes: int) -> None:
  """Refuses a workdir that holds a run of another model or dataset."""
  if not paths.exists(paths.join(workdir, "config.json")):
    return
  old, new = load_config_dict(workdir), json.loads(config.to_json_best_effort())
  diffs = [f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in IDENTITY_KEYS
           if _get(old, k) != _get(new, k)]
  old_classes = load_run(workdir)["num_classes"]
  if old_classes != num_classes:
    diffs.append(f"num_classes: {old_classes} -> {num_classes}")
  if diffs:
    raise errors.WorkdirMismatchError(
        f"Workdir {workdir} holds a run of a different model or dataset "
        f"({'; '.join(diffs)}). Use another --workdir, or pass --start_over to delete "
        "its checkpoints and train from scratch.")


def changed_settings(workdir: str, config: ml_collections.ConfigDict,
                     prefixes: tuple[str, ...] = ("",)) -> str:
  """A sentence listing "key: saved -> now" for each config value under `prefixes` that
  differs from the workdir's config.json (for errors about checkpoints the config no longer
  fits); keys the saved file lacks (added to vit_jax since) are left out."""
  if not paths.exists(paths.join(workdir, "config.json")):
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
                    image_shape, mean_C: np.ndarray, std_C: np.ndarray,
                    host_crops: bool = False) -> None:
  """config.json and run.json: what eval, predict, export and a resumed run read back.

  host_crops: the training data were photos cropped on the host (`Source.host_crops`):
  predict then reads new images as their evaluation did.
  """
  run = {"class_names": list(class_names), "num_classes": len(class_names),
         "image_shape": list(image_shape), "mean": np.asarray(mean_C).tolist(),
         "std": np.asarray(std_C).tolist(), "host_crops": host_crops}
  if jax.process_index() == 0:
    _atomic_write_json(paths.join(workdir, "config.json"),
                       json.loads(config.to_json_best_effort()))
    _atomic_write_json(paths.join(workdir, "run.json"), run)


def _run_file(workdir: str, name: str) -> str:
  path = paths.join(workdir, name)
  if not paths.exists(path):
    raise errors.NoRunError(f"{path} not found: {workdir} is not a vit_jax training workdir (train "
                            "into it with main.py --mode=train first).")
  return path


def load_config_dict(workdir: str) -> dict:
  return json.loads(paths.read_text(_run_file(workdir, "config.json")))


# Keys added to the config schema after runs had been written, with the value that reads
# an older run's config.json as it ran.
_ADDED_KEYS = {"input.worker_count": 0, "aug.eval_flip": False}


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config as its config.json holds it, keys added since filled in."""
  saved = load_config_dict(workdir)
  for dotted, value in _ADDED_KEYS.items():
    *parents, key = dotted.split(".")
    node = saved
    for parent in parents:
      node = node.setdefault(parent, {})
    node.setdefault(key, value)
  return ml_collections.ConfigDict(saved)


def load_run(workdir: str) -> dict:
  return json.loads(paths.read_text(_run_file(workdir, "run.json")))


def check_shared(workdir: str) -> None:
  """Refuses a multi-process run whose processes do not all see the same workdir.

  Orbax checkpoints of a multi-host run are written by all processes together into one
  folder: a workdir on each host's local disk would leave each with a part. Process 0
  writes a token file, the others must read it back.
  """
  if jax.process_count() == 1:
    return
  token = multihost_utils.broadcast_one_to_all(
      np.frombuffer(os.urandom(8), np.uint32) if jax.process_index() == 0
      else np.zeros(2, np.uint32))
  path = paths.join(workdir, f".shared-check-{int(token[0]):08x}{int(token[1]):08x}")
  if jax.process_index() == 0:
    paths.makedirs(workdir)
    paths.write_text_atomic(path, "vit_jax")
  parallel.sync("shared-check written")
  seen = multihost_utils.process_allgather(np.int32(paths.exists(path)))
  parallel.sync("shared-check read")
  if jax.process_index() == 0:
    paths.remove(path)
  blind = [i for i, ok in enumerate(np.ravel(seen)) if not ok]
  if blind:
    raise errors.WorkdirNotSharedError(
        f"--workdir={workdir} is not shared by the {jax.process_count()} processes: "
        f"process(es) {', '.join(map(str, blind))} cannot see the file process 0 wrote "
        "there. A multi-host run needs one folder every host sees: a shared file system "
        "(NFS, a mounted bucket) or a gs:// path, given as an absolute path.")


def start_over(workdir: str) -> None:
  """Deletes the run in `workdir` (its RUN_ENTRIES; other files stay), on every process."""
  if jax.process_index() == 0 and paths.isdir(workdir):
    for entry in RUN_ENTRIES:
      path = paths.join(workdir, entry)
      if paths.isdir(path):
        paths.rmtree(path)
      else:
        paths.remove(path)
  # No process may look at the workdir before process 0 has emptied it.
  parallel.sync("start_over")


# --- Loading what a workdir trained --------------------------------------------------------


@dataclasses.dataclass
class Trained:
  """A trained model and what it needs to run on new images."""
  config: ml_collections.ConfigDict
  model: models.VisionTransformer
  params: object
  step: int
  class_names: list[str]
  mean_C: np.ndarray
  std_C: np.ndarray
  host_crops: bool = False  # Photos cropped on the host: see write_run_files.


def load_trained(workdir: str, which: str = "best",
                 config: ml_collections.ConfigDict | None = None) -> Trained:
  """The model and parameters of a workdir's checkpoint.

  Args:
    workdir: a training workdir.
    which: "best" (falling back to "latest" when there is no best) or "latest".
    config: the config to build the model with; the run's own (config.json) by default.
      The checkpoint is always read with the run's own optimiser settings.

  Returns:
    A `Trained` (config, model, params, step, class names, normalisation statistics); the
    params are the EMA weights when the run kept an EMA (config.ema_decay > 0): the model
    it delivers.

  Raises:
    errors.NoRunError when the workdir holds no run or no checkpoint;
    errors.StateMismatchError when `config` changed a model setting the checkpoint
    depends on.
  """
  saved = load_config(workdir)
  run = load_run(workdir)
  config = config or saved
  with config.unlocked():
    config.total_steps = config.total_steps or saved.total_steps
  mesh = parallel.make_mesh()
  model = state_lib.build_model(config, run["num_classes"])
  input_shape = (config.image_size, config.image_size, run["image_shape"][-1])
  abstract_params = jax.eval_shape(lambda: state_lib.init_params(model, config.seed,
                                                                 input_shape))
  # The optimiser and EMA setting of the run that wrote the checkpoint (their state is part
  # of it), whatever the given config says: evaluation does not use them, and a changed
  # setting would otherwise make intact checkpoints unreadable to eval. (A config.json
  # written before EMA existed has no ema_decay.)
  tx = optim.make_optimizer(saved, abstract_params)
  ema = saved.get("ema_decay", 0.0) > 0
  abstract_state = jax.eval_shape(lambda params: state_lib.new_state(
      params, tx, jax.numpy.zeros((2,), jax.numpy.uint32), ema=ema), abstract_params)
  shardings = state_lib.state_shardings(abstract_state, mesh, config.fsdp)
  store = checkpoints.CheckpointStore(workdir, config.keep_checkpoints)
  abstract = checkpoints.abstract_with_shardings(abstract_state, shardings)
  restored = None
  try:
    for kind in ((which, "latest") if which == "best" else (which,)):
      restored = store.restore(abstract, kind)
      if restored is not None:
        break
  except errors.StateMismatchError as e:
    # Eval builds the run's own optimiser: only the model's settings can differ.
    changed = changed_settings(workdir, config, ("model.", "scan_layers", "image_size"))
    raise errors.StateMismatchError(f"{e} {changed}") from None
  finally:
    store.close()
  if restored is None:
    raise errors.NoRunError(f"No checkpoint in {workdir}/checkpoints or {workdir}/best: "
                            "train first (main.py --mode=train).")
  params = restored.state.params if restored.state.ema_params is None else (
      restored.state.ema_params)
  return Trained(config, model, params, restored.step, run["class_names"],
                 np.asarray(run["mean"], np.float32), np.asarray(run["std"], np.float32),
                 run.get("host_crops", False))
