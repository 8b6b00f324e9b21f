r"""The vit_jax command line: train, eval, predict, visualize, export, bench.

  python main.py --config=configs/cifar100.py --workdir=workdirs/cifar100
  python -m vit_jax --config=cifar100 --workdir=workdirs/cifar100     # recipes by name
  vit_jax --mode=eval --config=cifar100 --workdir=workdirs/cifar100   # the console script
  python main.py --config=configs/cifar100.py:keras --config.batch_size=128 --workdir=...
  python main.py --mode=bench --config=cifar100   # speed; needs no workdir

`--config` takes a recipe file (configs/NAME.py[:ARG]) or the name of an installed recipe
(NAME[:ARG]: cifar100, cifar10, fashion_mnist, imagenet, finetune).

Multi-host: the same command on every host. Under SLURM, Open MPI, on Cloud TPU VMs or
with JAX_COORDINATOR_ADDRESS set, the processes find each other; elsewhere add
--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import config as config_lib, errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A recipe: configs/NAME.py[:ARG], or an installed one by NAME[:ARG].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "predict", "visualize", "export", "bench"],
                          "What to do.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=export: the .npz file to write.")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                           "Checkpoint for eval/predict/visualize/export.")
_IMAGES = flags.DEFINE_list("images", [], "--mode=predict/visualize: image files or folders.")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"], "--mode=predict output.")
_START_OVER = flags.DEFINE_bool("start_over", False,
                                "Delete the workdir's run (checkpoints, logs, pictures) first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def run() -> None:
  """The entry point of main.py, `python -m vit_jax` and the `vit_jax` console script."""
  app.run(main, flags_parser=parse_flags)


def main(argv: list[str]) -> None:
  from vit_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_freed_memory()  # Before jax starts its threads: see host_memory.py.
  try:
    _run(argv)
  except errors.UserError as e:  # A mistake the user can fix: one line, exit status 1.
    sys.exit(f"ERROR: {e}")


def _run(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every step at INFO.
  # The modes are imported when chosen: importing jax is slow, and bench mode must run
  # where TFDS and TensorFlow are not installed.
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  joined = parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                          _PROCESS_ID.value)
  if joined:
    import jax  # pylint: disable=g-import-not-at-top
    print(f"Process {jax.process_index()} of {jax.process_count()} ({joined}): "
          f"{jax.local_device_count()} of {jax.device_count()} devices.", flush=True)
  mode, workdir, config = _MODE.value, _WORKDIR.value, _CONFIG.value
  if workdir is None and mode != "bench":
    raise app.UsageError(f"--mode={mode} needs --workdir=DIR.")
  if mode in ("train", "eval", "bench") and config is None:
    raise app.UsageError(f"--mode={mode} needs --config=configs/NAME.py.")
  if config is not None:
    config_lib.validate(config)  # Every mode: before any data or device work.
    _use_compilation_cache(config.compilation_cache_dir)
  if mode == "train":
    from vit_jax.train import loop, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    if _START_OVER.value:
      workdir_lib.start_over(workdir)
    loop.train_and_evaluate(config, workdir)
  elif mode == "eval":
    from vit_jax.tools import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, workdir, _WHICH.value)
  elif mode == "bench":
    from vit_jax.tools import bench  # pylint: disable=g-import-not-at-top
    bench.run(config)
  elif mode == "export":
    if not _OUTPUT.value:
      raise app.UsageError("--mode=export needs --output=PATH.npz.")
    from vit_jax.tools import export  # pylint: disable=g-import-not-at-top
    step_dir = export.export_workdir(workdir, _OUTPUT.value, _WHICH.value)
    print(f"Wrote {_OUTPUT.value} from {step_dir}.")
  elif mode == "predict":
    from vit_jax.tools import predict  # pylint: disable=g-import-not-at-top
    predict.predict_files(workdir, _IMAGES.value, which=_WHICH.value, fmt=_FORMAT.value)
  else:
    from vit_jax.tools import visualize  # pylint: disable=g-import-not-at-top
    visualize.make_pictures(workdir, _IMAGES.value, which=_WHICH.value)


def _use_compilation_cache(cache_dir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if cache_dir and jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))


# --- Flags ---------------------------------------------------------------------------------


def recipe_names() -> list[str]:
  """The installed recipes (configs/*.py, the package vit_jax.configs)."""
  from vit_jax import configs  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(configs.__file__)
  return sorted(name[:-3] for name in os.listdir(folder)
                if name.endswith(".py") and not name.startswith("_"))


def resolve_recipe(value: str) -> str:
  """`--config`'s value as a file: a bare NAME[:ARG] names an installed recipe."""
  name, sep, arg = value.partition(":")
  if name.endswith(".py") or os.sep in name or os.path.exists(name):
    return value
  if name not in recipe_names():
    raise errors.ConfigError(f"--config={value}: no recipe {name!r}; use one of "
                             f"{', '.join(recipe_names())}, or a path to a recipe file.")
  from vit_jax import configs  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(configs.__file__), f"{name}.py") + sep + arg


def _resolve_config_flag(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + resolve_recipe(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_recipe(out[i + 1])
  return out


def _unknown_key_message(error: Exception, argv: list[str]) -> str:
  text = str(error)
  missing = (re.search(r'instead of "(\w+)"', text) or
             re.search(r"""['"]([A-Za-z_]\w*)""", text))
  name = missing.group(1) if missing else "?"
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  culprit = next((a for a in overrides
                  if name in a.split("=", 1)[0][len("--config."):].split(".")),
                 overrides[0] if overrides else "--config.?")
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  hint = f' Did you mean "{suggestion.group(1)}"?' if suggestion else ""
  return (f"{culprit}: the config has no key {name!r}.{hint} Every key, with its "
          "default, is in vit_jax/config.py.")


def parse_flags(argv: list[str], flag_values=None) -> list[str]:
  """absl's flag parsing (FATAL message and exit status 1 on a bad flag), with recipes by
  name and a clear message for an override of a config key that does not exist."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(_resolve_config_flag(argv))
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:  # ml_collections: no such key in the config.
    message = _unknown_key_message(e, argv)
  except errors.UserError as e:
    message = str(e)
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                   "Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)
