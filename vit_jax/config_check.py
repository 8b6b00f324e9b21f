"""Config mistakes caught before any compute starts, each named with its allowed values."""
from __future__ import annotations

import numbers

import ml_collections

from vit_jax import models

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
_POSITIVE_INTS = ("batch_size", "eval_batch_size", "log_every_steps", "eval_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints", "image_size",
                  "optim.accum_steps")
_NON_NEGATIVE_NUMBERS = ("optim.lr", "optim.weight_decay", "optim.grad_clip_norm",
                         "label_smoothing", "num_epochs", "optim.warmup_steps",
                         "total_steps")


class ConfigError(ValueError):
  pass


def _get(config: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key, its value and what is allowed."""
  for key, allowed in _CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise ConfigError(f"config.{key}={value!r} is not allowed; use one of {allowed}.")
  if config.model.name not in models.list_models():
    raise ConfigError(f"config.model.name={config.model.name!r} is not a registered model; "
                      f"use one of {models.list_models()}.")
  for key in _POSITIVE_INTS:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
      raise ConfigError(f"config.{key}={value!r} must be a positive integer.")
  for key in _NON_NEGATIVE_NUMBERS:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
      raise ConfigError(f"config.{key}={value!r} must be a number >= 0.")
  if config.total_steps == 0 and config.num_epochs <= 0:
    raise ConfigError("config.total_steps=0 and config.num_epochs=0: set one of them > 0.")
  if config.batch_size % config.optim.accum_steps:
    raise ConfigError(f"config.batch_size={config.batch_size} must divide by "
                      f"config.optim.accum_steps={config.optim.accum_steps}.")
  patch = (config.model.overrides.patch_size or
           models.get_spec(config.model.name).fields["patch_size"])
  if config.image_size % patch:
    raise ConfigError(
        f"config.image_size={config.image_size} is not divisible by the patch size {patch} "
        f"of {config.model.name}: use a multiple of {patch}, e.g. "
        f"{max(patch, config.image_size // patch * patch)}.")
  if config.dataset == "folder" and not config.data_dir:
    raise ConfigError("config.dataset='folder' needs config.data_dir=/path/to/images with "
                      "train/CLASS/*.jpg and test/CLASS/*.jpg.")
