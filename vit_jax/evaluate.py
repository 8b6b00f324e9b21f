"""Evaluation of a trained workdir, and loading its model for prediction and pictures."""
from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import numpy as np

from vit_jax import (checkpoints, config_check, data, models, optim, parallel, run_files,
                     state as state_lib, steps)


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  model: models.VisionTransformer
  params: object
  step: int
  class_names: list[str]
  mean_C: np.ndarray
  std_C: np.ndarray


def load_trained(workdir: str, which: str = "best",
                 config: ml_collections.ConfigDict | None = None) -> Trained:
  """The model and parameters of `which` checkpoint ("best" falls back to "latest").

  The config defaults to the one the run saved in the workdir.
  """
  saved = run_files.load_config(workdir)
  run = run_files.load_run(workdir)
  config = config or saved
  with config.unlocked():
    config.total_steps = config.total_steps or saved.total_steps
  mesh = parallel.make_mesh()
  model = state_lib.build_model(config, run["num_classes"])
  input_shape = (config.image_size, config.image_size, run["image_shape"][-1])
  abstract_params = jax.eval_shape(lambda: state_lib.init_params(model, config.seed,
                                                                 input_shape))
  # The optimiser of the run that wrote the checkpoint (its state is part of it), whatever
  # the given config says: evaluation does not use it, and a changed optimiser setting
  # would otherwise make intact checkpoints unreadable to eval.
  tx = optim.make_optimizer(saved, abstract_params)
  abstract_state = jax.eval_shape(lambda: state_lib.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32), params=abstract_params,
      opt_state=tx.init(abstract_params), rng=jax.numpy.zeros((2,), jax.numpy.uint32)))
  shardings = state_lib.state_shardings(abstract_state, mesh, config.fsdp)
  store = checkpoints.CheckpointStore(workdir, config.keep_checkpoints)
  abstract = checkpoints.abstract_with_shardings(abstract_state, shardings)
  restored = None
  try:
    for kind in ((which, "latest") if which == "best" else (which,)):
      restored = store.restore(abstract, kind)
      if restored is not None:
        break
  except checkpoints.StateMismatchError as e:
    # Eval builds the run's own optimiser: only the model's settings can differ.
    changed = run_files.changed_settings(workdir, config, ("model.", "scan_layers",
                                                          "image_size"))
    raise checkpoints.StateMismatchError(f"{e} {changed}") from None
  finally:
    store.close()
  if restored is None:
    raise run_files.NoRunError(f"No checkpoint in {workdir}/checkpoints or {workdir}/best: "
                            "train first (main.py --mode=train).")
  return Trained(config, model, restored.state.params, restored.step, run["class_names"],
                 np.asarray(run["mean"], np.float32), np.asarray(run["std"], np.float32))


def evaluate(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict:
  """Scores `config.eval_split` with the workdir's best (or latest) checkpoint."""
  config_check.validate(config)
  trained = load_trained(workdir, which, config)
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.eval_batch_size, "config.eval_batch_size")
  source = data.load_source(config, config.eval_split)
  param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, trained.params)
  eval_step = steps.make_eval_step(config, trained.model, mesh, param_shardings,
                                   mean_C=trained.mean_C, std_C=trained.std_C)
  result = steps.run_eval(eval_step, trained.params, data.eval_batches(
      source, batch_size=config.eval_batch_size, mesh=mesh))
  result["step"] = trained.step
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return result
