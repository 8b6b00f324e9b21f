"""--mode=eval: the eval split scored with a trained workdir's checkpoint.

  python main.py --mode=eval --config=configs/NAME.py --workdir=DIR [--checkpoint=latest]
"""
from __future__ import annotations

import json

import jax
import ml_collections

from vit_jax import config as config_lib, data, parallel
from vit_jax.train import steps, workdir as workdir_lib


def evaluate(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict:
  """Scores `config.eval_split` with the workdir's best (or latest) checkpoint.

  Args:
    config: sets the eval split, batch size and preprocessing (and the model, which must
      match the checkpoint's).
    workdir: a training workdir.
    which: "best" (else the latest) or "latest".

  Returns:
    {"eval/loss", "eval/top1", "eval/top5", "eval/num_examples", "step"}, also printed as
    one JSON line.
  """
  config_lib.validate(config)
  trained = workdir_lib.load_trained(workdir, which, config)
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
