r"""The vit_jax command line: train, eval, predict, visualize, export, bench.

  python main.py --config=configs/cifar100.py --workdir=workdirs/cifar100
  python -m vit_jax --config=cifar100 --workdir=workdirs/cifar100     # recipes by name
  vit_jax --mode=eval --config=cifar100 --workdir=workdirs/cifar100   # the console script
  python main.py --config=configs/cifar100.py:keras --config.batch_size=128 --workdir=...
  python main.py --mode=bench --config=cifar100   # speed; needs no workdir

`--config` takes a recipe file (configs/NAME.py[:ARG]) or the name of an installed recipe
(NAME[:ARG]: cifar100, cifar10, fashion_mnist, imagenet, finetune).

Paths (flags and the config's data_dir, manual_dir, init_from) are relative to the
current folder, or URLs of an object store (gs://bucket/run: `vit_jax.paths`). A mistake
the user can fix is one `ERROR: ...` line and exit status 1. The libraries' start-up
lines and logs below errors are off unless --verbosity is given.

Multi-host: the same command on every host. Under SLURM, Open MPI, on Cloud TPU VMs or
with JAX_COORDINATOR_ADDRESS set, the processes find each other; elsewhere add
--coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process.
"""
from __future__ import annotations

import difflib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import config as config_lib, errors, paths
from vit_jax.models import hub

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
    raise errors.UsageError(f"Unexpected arguments {' '.join(argv[1:])}: every setting is a "
                            "flag, e.g. --workdir=DIR (main.py --helpshort lists them).")
  mode, config = _MODE.value, _config()
  workdir, output = _absolute(_WORKDIR.value), _absolute(_OUTPUT.value)
  images = [_absolute(path) for path in _IMAGES.value]
  _check_usage(mode, workdir, config, output)
  _quiet_console()
  # The modes are imported when chosen: importing jax is slow, and bench mode must run
  # where TFDS and TensorFlow are not installed.
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  joined = parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                           _PROCESS_ID.value)
  if joined:
    import jax  # pylint: disable=g-import-not-at-top
    print(f"Process {jax.process_index()} of {jax.process_count()} ({joined}): "
          f"{jax.local_device_count()} of {jax.device_count()} devices.", flush=True)
  if config is not None:
    for key in _CONFIG_PATHS:
      if config[key] and not (key == "init_from" and hub.is_name(config[key])):
        setattr(config, key, _absolute(config[key]))  # Not a name like "augreg:ViT-B/16".
    config_lib.validate(config)  # Every mode: before any data or device work.
    _use_compilation_cache(config.compilation_cache_dir)
  if workdir is not None:
    from vit_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir_lib.check_folder(workdir)
  if mode == "train":
    from vit_jax.train import loop  # pylint: disable=g-import-not-at-top
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
    from vit_jax.tools import export  # pylint: disable=g-import-not-at-top
    step_dir = export.export_workdir(workdir, output, _WHICH.value)
    print(f"Wrote {output} from {step_dir}.")
  elif mode == "predict":
    from vit_jax.tools import predict  # pylint: disable=g-import-not-at-top
    predict.predict_files(workdir, images, which=_WHICH.value, fmt=_FORMAT.value)
  else:
    from vit_jax.tools import visualize  # pylint: disable=g-import-not-at-top
    visualize.make_pictures(workdir, images, which=_WHICH.value)


# Config keys that hold local paths (or URLs): made absolute with the flags' paths.
_CONFIG_PATHS = ("data_dir", "manual_dir", "init_from", "init_cache_dir",
                 "compilation_cache_dir")


def _absolute(path: str | None) -> str | None:
  """`path` against the current folder, with `~` expanded: made absolute once, here, so
  that every layer below (orbax insists on absolute paths) gets the folder the user meant.
  None, "" and URLs (gs://bucket/dir) stay as they are."""
  return paths.absolute(path) if path else path


def _config():
  """--config's ConfigDict, or None; a recipe that fails to load is a ConfigError."""
  config = _CONFIG.value
  try:
    if config is not None:
      config.keys  # pylint: disable=pointless-statement  # Raises a deferred loading error.
    return config
  except OSError as e:  # ml_collections defers an OSError of the recipe to the first read.
    cause = e.__cause__ or e
    reason = (str(cause).strip().splitlines() or [""])[0]
    raise errors.ConfigError(f"--config={flags.FLAGS['config'].config_filename}: "
                             f"{type(cause).__name__}: {reason}") from None


# The flags each mode reads (the multi-host ones aside, which every mode takes).
_MODE_FLAGS = {
    "train": ("config", "workdir", "start_over"),
    "eval": ("config", "workdir", "checkpoint"),
    "bench": ("config",),
    "predict": ("workdir", "images", "checkpoint", "format"),
    "visualize": ("workdir", "images", "checkpoint"),
    "export": ("workdir", "output", "checkpoint"),
}


def _check_usage(mode: str, workdir: str | None, config, output: str | None) -> None:
  """Flags that the mode cannot do without, and flags it would ignore: checked before jax
  starts or anything is read."""
  every_mode_flag = dict.fromkeys(name for names in _MODE_FLAGS.values() for name in names)
  unused = [name for name in every_mode_flag
            if flags.FLAGS[name].present and name not in _MODE_FLAGS[mode]]
  if unused:
    raise errors.UsageError("; ".join(_why_unused(mode, name) for name in unused) + ".")
  if workdir is None and mode != "bench":
    raise errors.UsageError(f"--mode={mode} needs --workdir=DIR.")
  if mode in ("train", "eval", "bench") and config is None:
    raise errors.UsageError(f"--mode={mode} needs --config=NAME (one of "
                            f"{', '.join(recipe_names())}) or --config=PATH/TO/RECIPE.py.")
  if mode == "export" and not output:
    raise errors.UsageError("--mode=export needs --output=PATH.npz (the file to write).")


def _why_unused(mode: str, name: str) -> str:
  if name == "config" and mode in ("predict", "visualize", "export"):
    return (f"--mode={mode} does not use --config: it reads the run's own settings (the "
            "workdir's config.json)")
  if name == "workdir":
    return "--mode=bench does not use --workdir: it writes nothing"
  users = [m for m, names in _MODE_FLAGS.items() if name in names]
  modes = " and ".join(filter(None, [", ".join(users[:-1]), users[-1]]))
  return f"--mode={mode} does not use --{name} (a flag of --mode={modes})"


def _quiet_console() -> None:
  """Without --verbosity, only what vit_jax prints and errors reach the console: not
  TensorFlow's C++ start-up lines (TFDS imports TensorFlow to prepare data; the variable
  is read when it is imported) nor the libraries' Python warnings (Orbax, TFDS and jax
  log routine events that vit_jax reports in its own words where they matter)."""
  if flags.FLAGS["verbosity"].present:
    return
  # jax sets 1 (no INFO) when it is imported and the variable is unset; a user's 0 stays.
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # Errors only.
  logging.set_verbosity(logging.ERROR)


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
  """`--config`'s value as a file: a bare NAME[:ARG] names an installed recipe.

  Raises:
    errors.ConfigError naming the value and the recipes when there is no such file or
    recipe (ml_collections would fail later, with a traceback).
  """
  name, sep, arg = value.partition(":")
  recipes = recipe_names()
  is_path = name.endswith(".py") or os.sep in name or os.path.exists(name)
  if is_path and os.path.isfile(name):
    return value
  stem = os.path.splitext(os.path.basename(name))[0]
  close = difflib.get_close_matches(stem, recipes, n=1)
  hint = f" Did you mean {close[0]}?" if close else ""
  if is_path:
    what = f"{name} is not a file" if os.path.exists(name) else f"there is no file {name}"
    raise errors.ConfigError(f"--config={value}: {what} (from {os.getcwd()}).{hint} The "
                             f"recipes: {', '.join(recipes)}, by name (--config=NAME) or as "
                             "a path to the file.")
  if name not in recipes:
    raise errors.ConfigError(f"--config={value}: no recipe {name!r}.{hint} Use one of "
                             f"{', '.join(recipes)}, or a path to a recipe file.")
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
  """absl's flag parsing, with recipes by name; a bad flag (an unknown one, a value of the
  wrong type, an override of a config key that does not exist, a recipe that is not
  there) is one `ERROR: ...` line on stderr and exit status 1, as every other mistake."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(_resolve_config_flag(argv))
  except flags.Error as e:
    # A recipe that raises while loading comes with its traceback: keep what it said.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
  except SyntaxError as e:  # A recipe file that is not Python.
    message = f"--config: {e.filename}, line {e.lineno}: {e.msg}: {(e.text or '').strip()}"
  except (AttributeError, KeyError) as e:  # ml_collections: no such key in the config.
    message = (f"--config: the recipe has no get_config() ({e})." if "get_config" in str(e)
               else _unknown_key_message(e, argv))
  except errors.UserError as e:
    message = str(e)
  sys.stderr.write(f"ERROR: {message}\n")
  sys.exit(1)
