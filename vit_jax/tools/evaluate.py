"""--mode=eval: the eval split scored with a trained workdir's checkpoint.

  python main.py --mode=eval --config=configs/NAME.py --workdir=DIR [--checkpoint=latest]

prints one JSON line (loss, top-1, top-5, examples, step) and writes, per class, the
examples, correct top-1 predictions and accuracy with the confusion matrix to
DIR/eval_per_class.json, and the matrix as a picture to DIR/pictures/confusion_matrix.png.
"""
from __future__ import annotations

import json

import jax
import ml_collections

from vit_jax import config as config_lib, data, parallel, paths
from vit_jax.train import metrics, report, steps, workdir as workdir_lib

PER_CLASS_FILE = "eval_per_class.json"
CONFUSION_PICTURE = "confusion_matrix.png"


def evaluate(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict:
  """Scores `config.eval_split` with the workdir's best (or latest) checkpoint.

  Args:
    config: sets the eval split, batch size and preprocessing (and the model, which must
      match the checkpoint's).
    workdir: a training workdir.
    which: "best" (else the latest) or "latest".

  Returns:
    {"eval/loss", "eval/top1", "eval/top5", "eval/num_examples", "step", "per_class",
    "confusion_matrix"} (the last two: the files written), also printed as one JSON line.
  """
  config_lib.validate(config)
  trained = workdir_lib.load_trained(workdir, which, config)
  result = evaluate_trained(trained, workdir, which)
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return result


def evaluate_trained(trained: workdir_lib.Trained, workdir: str, which: str) -> dict:
  """`trained.config.eval_split` scored with `trained`; writes the per-class file and the
  confusion-matrix picture into `workdir`. Returns what `evaluate` does."""
  config = trained.config
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.eval_batch_size, "config.eval_batch_size")
  source = data.load_source(config, config.eval_split)
  # Where the checkpoint put them (FSDP or replicated); host arrays go replicated.
  param_shardings = jax.tree_util.tree_map(
      lambda x: getattr(x, "sharding", None) or parallel.replicated(mesh), trained.params)
  eval_step = steps.make_eval_step(data.for_device(config, source.host_crops), trained.model, mesh,
                                   param_shardings, mean_C=trained.mean_C, std_C=trained.std_C)
  totals = steps.eval_totals(eval_step, trained.params, data.eval_batches(
      source, batch_size=config.eval_batch_size, mesh=mesh,
      worker_count=config.input.worker_count))
  result = {**metrics.finalize_eval(totals), "step": trained.step}
  per_class = {"step": trained.step, "checkpoint": which, "split": config.eval_split,
               **result, "per_class": metrics.per_class(totals["confusion"],
                                                        trained.class_names),
               "confusion_matrix": totals["confusion"].tolist()}
  result["per_class"] = paths.join(workdir, PER_CLASS_FILE)
  result["confusion_matrix"] = paths.join(report.pictures_dir(workdir), CONFUSION_PICTURE)
  if jax.process_index() == 0:
    _atomic_write_json(result["per_class"], per_class)
    plot_per_class(per_class, trained.class_names, workdir)
  return result


def read_per_class(workdir: str) -> dict | None:
  """The workdir's eval_per_class.json, or None before the first `--mode=eval`."""
  path = paths.join(workdir, PER_CLASS_FILE)
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))


def plot_per_class(per_class: dict, class_names: list[str], workdir: str) -> str:
  """The confusion matrix of an eval_per_class.json as workdir/pictures/confusion_matrix.png."""
  title = (f"{paths.basename(workdir)}: {per_class['split']}, step "
           f"{per_class['step']} ({per_class['checkpoint']}), top-1 "
           f"{per_class['eval/top1']:.2%} of {per_class['eval/num_examples']:,}")
  return report.plot_confusion_matrix(
      per_class["confusion_matrix"], class_names, title,
      paths.join(report.pictures_dir(workdir), CONFUSION_PICTURE))


def _atomic_write_json(path: str, obj) -> None:
  # One line: indented, a 1000-class matrix would be a million.
  paths.write_text_atomic(path, json.dumps(obj))
