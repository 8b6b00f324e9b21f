r"""vit_jax command line: train, eval, predict, visualize, export, bench.

  python main.py --config=configs/cifar100.py --workdir=workdirs/cifar100
  python main.py --mode=eval --config=configs/cifar100.py --workdir=workdirs/cifar100
  python main.py --config=configs/cifar100.py:keras --config.batch_size=128 --workdir=...
  python main.py --mode=bench --config=configs/cifar100.py   # speed; needs no workdir

Multi-host: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I to
every process (found automatically on TPU pods and SLURM).
"""
import os
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import config_check, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file[:ARG].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "predict", "visualize", "export", "bench"],
                          "What to do.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=export: the .npz file to write.")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                           "Checkpoint for eval/predict/visualize.")
_IMAGES = flags.DEFINE_list("images", [], "--mode=predict/visualize: image files or folders.")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"], "--mode=predict output.")
_START_OVER = flags.DEFINE_bool("start_over", False,
                                "Delete the workdir's run (checkpoints, logs, pictures) first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


# What a run writes into its workdir: --start_over deletes these and nothing else.
_RUN_ENTRIES = ("checkpoints", "best", "tensorboard", "pictures", "metrics.jsonl",
                "config.json", "run.json", "final_metrics.json")


def _start_over(workdir: str) -> None:
  import jax
  from jax.experimental import multihost_utils
  if jax.process_index() == 0 and os.path.isdir(workdir):
    for entry in _RUN_ENTRIES:
      path = os.path.join(workdir, entry)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  # No process may look at the workdir before process 0 has emptied it.
  multihost_utils.sync_global_devices("start_over")


def _use_compilation_cache(cache_dir: str) -> None:
  import jax
  if cache_dir and jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))


def main(argv):
  from vit_jax import host_memory
  host_memory.keep_freed_memory()  # Before jax starts its threads: see host_memory.py.
  try:
    _run(argv)
  except errors.UserError as e:  # A mistake the user can fix: one line, exit status 1.
    sys.exit(f"ERROR: {e}")


def _run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO.
  from vit_jax import parallel  # After flag parsing: importing jax is slow.
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  mode, workdir, config = _MODE.value, _WORKDIR.value, _CONFIG.value
  if workdir is None and mode != "bench":
    raise app.UsageError(f"--mode={mode} needs --workdir=DIR.")
  if mode in ("train", "eval", "bench") and config is None:
    raise app.UsageError(f"--mode={mode} needs --config=configs/NAME.py.")
  if config is not None:
    config_check.validate(config)  # Every mode: before any data or device work.
    _use_compilation_cache(config.compilation_cache_dir)
  if mode == "train":
    if _START_OVER.value:
      _start_over(workdir)
    from vit_jax import train
    train.train_and_evaluate(config, workdir)
  elif mode == "eval":
    from vit_jax import evaluate
    evaluate.evaluate(config, workdir, _WHICH.value)
  elif mode == "bench":
    from vit_jax import bench
    bench.run(config)
  elif mode == "export":
    if not _OUTPUT.value:
      raise app.UsageError("--mode=export needs --output=PATH.npz.")
    from vit_jax import pretrained
    step_dir = pretrained.export_workdir(workdir, _OUTPUT.value, _WHICH.value)
    print(f"Wrote {_OUTPUT.value} from {step_dir}.")
  elif mode == "predict":
    from vit_jax import predict
    predict.predict_files(workdir, _IMAGES.value, which=_WHICH.value, fmt=_FORMAT.value)
  else:
    from vit_jax import visualize
    visualize.make_pictures(workdir, _IMAGES.value, which=_WHICH.value)


if __name__ == "__main__":
  app.run(main, flags_parser=config_check.parse_flags)
