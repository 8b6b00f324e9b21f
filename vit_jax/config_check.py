"""Config mistakes caught before any compute starts, each named with its allowed values.

`validate(config)` runs first in every mode that takes a config (train, eval), before
the mesh, the data or a checkpoint is touched. Every error is a `ConfigError` (a
ValueError) that reads "config.KEY=VALUE is not allowed: WHAT IS" (or names the keys
that clash).

`parse_flags` is an absl flags parser for main.py (`app.run(main, flags_parser=...)`):
absl's own, except that an override of a key the config does not have (a typo such as
`--config.optim.lr_=0.1`) is a one-line usage error instead of a traceback.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import sys

import ml_collections

from vit_jax import errors, models


class ConfigError(errors.UserError, ValueError):
  pass


_CHOICES = {
    "aug.normalize": ("dataset", "minus_one_one", "imagenet"),
    "aug.crop": ("none", "pad_crop", "inception"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.weight_decay_mode": ("decoupled_lr", "decoupled"),
    "compute_dtype": ("float32", "bfloat16", "float16"),
    "best_metric": ("top1", "top5", "loss"),
    "on_nonfinite": ("stop", "skip"),
    "init_head": ("auto", "reset", "keep"),
    "init_pre_logits": ("drop", "keep"),
}
# Integers: key -> (minimum, maximum or None, what a special value means).
_INTS = {
    "batch_size": (1, None, ""),
    "eval_batch_size": (1, None, ""),
    "log_every_steps": (1, None, ""),
    "eval_every_steps": (1, None, ""),
    "checkpoint_every_steps": (1, None, ""),
    "keep_checkpoints": (1, None, ""),
    "image_size": (1, None, ""),
    "optim.accum_steps": (1, None, ""),
    "total_steps": (0, None, " (0 = from config.num_epochs)"),
    "optim.warmup_steps": (0, None, ""),
    "load_size": (0, None, " (0 = config.image_size)"),
    "seed": (0, 2**32 - 1, ""),
    "aug.crop_padding": (0, None, ""),
    "aug.randaugment_layers": (0, None, " (0 = off)"),
    "bench.warmup_steps": (0, None, ""),
    "bench.steps": (1, None, ""),
    "bench.eval_steps": (1, None, ""),
    "bench.input_batches": (0, None, " (0 = skip the input pipeline)"),
    "bench.matmul_size": (0, None, " (0 = no CPU peak, no MFU)"),
    "bench.matmul_reps": (1, None, ""),
}
# Finite real numbers: key -> (low, low included, high, high included).
_REALS = {
    "optim.lr": (0, True, math.inf, False),
    "optim.weight_decay": (0, True, math.inf, False),
    "optim.grad_clip_norm": (0, True, math.inf, False),
    "optim.b1": (0, True, 1, False),
    "optim.b2": (0, True, 1, False),
    "optim.eps": (0, True, math.inf, False),
    "optim.momentum": (0, True, 1, False),
    "optim.end_lr_fraction": (0, True, 1, True),
    "label_smoothing": (0, True, 1, False),
    "num_epochs": (0, True, math.inf, False),
    "optim.warmup_epochs": (0, True, math.inf, False),
    "layer_decay": (0, False, 1, True),
    "backbone_lr_mult": (0, True, math.inf, False),
    "aug.rotate": (0, True, 1, True),
    "aug.zoom": (0, True, 1, False),
    "aug.randaugment_magnitude": (0, True, 10, True),
    "aug.mixup_alpha": (0, True, math.inf, False),
    "aug.cutmix_alpha": (0, True, math.inf, False),
    "aug.mix_prob": (0, True, 1, True),
    "aug.mix_switch_prob": (0, True, 1, True),
    "aug.random_erasing": (0, True, 1, True),
    "aug.eval_crop_fraction": (0, False, 1, True),
}
_BOOLS = ("aug.flip", "optim.decay_kernels_only", "fsdp", "remat", "scan_layers",
          "freeze_backbone")
_STRINGS = ("dataset", "train_split", "eval_split", "model.name")
_OPTIONAL_STRINGS = ("data_dir", "manual_dir", "val_split", "init_from")
# Model fields (config.model.overrides.*) with a range other than their type's default.
_MODEL_CHOICES = {"pool": ("token", "gap", "flatten")}
_MODEL_INT_MINIMUM = {"representation_size": 0}  # 0 = no pre_logits layer; others >= 1.


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _fail(key: str, value, allowed: str) -> ConfigError:
  return ConfigError(f"config.{key}={value!r} is not allowed: {allowed}.")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _interval(low, low_in: bool, high, high_in: bool) -> str:
  if high == math.inf:
    return f"a finite number {'>=' if low_in else '>'} {low}"
  return f"a number in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _check_int(key: str, value, minimum: int, maximum: int | None, note: str = "") -> None:
  if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
    allowed = f"an integer >= {minimum}" if maximum is None else (
        f"an integer in [{minimum}, {maximum}]")
    raise _fail(key, value, f"use {allowed}{note}")


def _check_real(key: str, value, low, low_in: bool, high, high_in: bool) -> None:
  ok = _is_real(value) and math.isfinite(value) and (
      value >= low if low_in else value > low) and (value <= high if high_in else value < high)
  if not ok:
    raise _fail(key, value, f"use {_interval(low, low_in, high, high_in)}")


def _check_model_overrides(overrides: ml_collections.ConfigDict) -> None:
  fields = {f.name: str(f.type) for f in dataclasses.fields(models.VisionTransformer)
            if f.name not in ("parent", "name")}
  for name, value in overrides.items():
    key = f"model.overrides.{name}"
    if name not in fields:
      raise ConfigError(f"config.{key} is not a field of the model: use one of "
                        f"{', '.join(sorted(fields))}.")
    if value is None:  # The registry entry's value.
      continue
    hint = fields[name]  # The annotation, e.g. "int | None" or "Sequence[int]".
    if name in _MODEL_CHOICES:
      if value not in _MODEL_CHOICES[name]:
        raise _fail(key, value, f"use one of {_MODEL_CHOICES[name]}")
    elif "bool" in hint:
      if not isinstance(value, bool):
        raise _fail(key, value, "use True or False")
    elif "Sequence" in hint or "tuple" in hint:
      if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 1 for v in value):
        raise _fail(key, value, "use a tuple of integers >= 1, e.g. (512,) or ()")
    elif "int" in hint:
      _check_int(key, value, _MODEL_INT_MINIMUM.get(name, 1), None)
    elif "float" in hint:
      if "rate" in name:
        _check_real(key, value, 0, True, 1, False)
      else:
        _check_real(key, value, -math.inf, False, math.inf, False)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key, its value and what is allowed."""
  for key in _STRINGS:
    value = _get(config, key)
    if not isinstance(value, str) or not value:
      raise _fail(key, value, "use a non-empty string")
  for key in _OPTIONAL_STRINGS:
    value = _get(config, key)
    if value is not None and not isinstance(value, str):
      raise _fail(key, value, "use a string (a path or split) or None")
  for key, allowed in _CHOICES.items():
    value = _get(config, key)
    if not isinstance(value, str) or value not in allowed:
      raise _fail(key, value, f"use one of {allowed}")
  if config.model.name not in models.list_models():
    raise ConfigError(f"config.model.name={config.model.name!r} is not a registered model: "
                      f"use one of {models.list_models()}.")
  for key, (minimum, maximum, note) in _INTS.items():
    _check_int(key, _get(config, key), minimum, maximum, note)
  for key, bounds in _REALS.items():
    _check_real(key, _get(config, key), *bounds)
  for key in _BOOLS:
    value = _get(config, key)
    if not isinstance(value, bool):
      raise _fail(key, value, "use True or False")
  scale = config.aug.crop_scale
  if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and all(map(_is_real, scale))
          and 0 < scale[0] <= scale[1] <= 1):
    raise _fail("aug.crop_scale", scale, "use (low, high) with 0 < low <= high <= 1")
  _check_model_overrides(config.model.overrides)

  if config.total_steps == 0 and config.num_epochs == 0:
    raise ConfigError("config.total_steps=0 and config.num_epochs=0: set one of them > 0.")
  if config.optim.warmup_steps and config.optim.warmup_epochs:
    raise ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps} and "
                      f"config.optim.warmup_epochs={config.optim.warmup_epochs}: set one of "
                      "them, the other to 0.")
  if config.batch_size % config.optim.accum_steps:
    raise ConfigError(f"config.batch_size={config.batch_size} must divide by "
                      f"config.optim.accum_steps={config.optim.accum_steps}.")
  fields = {**models.get_spec(config.model.name).fields,
            **{k: v for k, v in config.model.overrides.items() if v is not None}}
  patch = fields["patch_size"]
  if config.image_size % patch:
    raise ConfigError(
        f"config.image_size={config.image_size} is not divisible by the patch size {patch} "
        f"of {config.model.name}: use a multiple of {patch}, e.g. "
        f"{max(patch, config.image_size // patch * patch)}.")
  if fields.get("pool", "token") == "token" and not fields.get("class_token", True):
    raise ConfigError("config.model.overrides.pool='token' needs class_token=True: set "
                      "config.model.overrides.pool to 'gap' or 'flatten', or class_token "
                      "to True.")
  if config.dataset == "folder" and not config.data_dir:
    raise ConfigError("config.dataset='folder' needs config.data_dir=/path/to/images with "
                      "train/CLASS/*.jpg and test/CLASS/*.jpg.")


# --- Command line ------------------------------------------------------------------------


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
          "default, is in configs/common.py.")


def parse_flags(argv: list[str], flag_values=None) -> list[str]:
  """absl's flag parsing (FATAL message and exit status 1 on a bad flag), with a clear
  message for an override of a config key that does not exist."""
  from absl import flags
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:  # ml_collections: no such key in the config.
    message = _unknown_key_message(e, argv)
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                   "Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)
