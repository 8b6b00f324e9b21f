"""The config schema: every key with its default, validation, and steps from epochs.

Recipes (configs/*.py, installed as `vit_jax.configs`) start from `get_base_config()` and
set what differs. Every key lives here, so `--config.KEY=VALUE` overrides are checked
against one list (ml_collections refuses unknown keys) and the code never needs
`config.get(key, default)`.

`validate(config)` runs first in every mode that takes a config, before the mesh, the
data or a checkpoint is touched. Every error is an `errors.ConfigError` (a ValueError)
that reads "config.KEY=VALUE is not allowed: WHAT IS" (or names the keys that clash).
`resolve_steps(config, num_train_examples)` turns epochs into steps at the run's batch
size.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import ml_collections

from vit_jax import errors, models
from vit_jax.models import hub


def get_base_config() -> ml_collections.ConfigDict:
  """Every key with its default; recipes change what they need."""
  config = ml_collections.ConfigDict()
  for add_keys in (_data, _augmentation, _model, _optimiser, _run, _fine_tuning, _bench):
    add_keys(config)
  return config


def _data(config: ml_collections.ConfigDict) -> None:
  """Data."""
  # A TFDS dataset name (cifar100, fashion_mnist, imagenet2012, ...) or "folder":
  # images in `data_dir/{train_split,eval_split}/CLASS/*.{jpg,png}`.
  config.dataset = "cifar100"
  # TFDS data dir (None: TFDS's default), or the image folder.
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  # Already-downloaded source files TFDS prepares the dataset from.
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.train_split = "train"
  config.eval_split = "test"
  # Optional held-out split (e.g. "train[90%:]"): evaluated every eval_every_steps,
  # picks the best checkpoint, and the eval_split is then scored with that checkpoint.
  config.val_split = ml_collections.FieldReference(None, field_type=str)
  config.image_size = 32  # The model's input resolution (batches are resized on device).
  # The input pipeline (grain): processes that read, decode and (photos) crop the batches
  # ahead of the step. 0 = threads of the training process, enough for in-memory datasets
  # and a few cores; photos on a many-core host want several (README, Data).
  config.input = ml_collections.ConfigDict()
  config.input.worker_count = 0


def _augmentation(config: ml_collections.ConfigDict) -> None:
  """Augmentation (batched, on the device, inside the jitted train step)."""
  config.aug = ml_collections.ConfigDict()
  # Pixel normalisation: "dataset" (train-set per-channel mean/std, the Keras origin),
  # "minus_one_one" (x/127.5-1, the published checkpoints), "imagenet" (mean/std).
  config.aug.normalize = "dataset"
  # Geometry: "none", "pad_crop" (pad by crop_padding, random crop), "inception"
  # (random-resized crop, scale crop_scale), resize always to image_size afterwards.
  config.aug.crop = "none"
  config.aug.crop_padding = 4
  config.aug.crop_scale = (0.08, 1.0)
  # Evaluation keeps the central fraction of each side before resizing: 1.0 the whole
  # image (the published ViT fine-tuning), 0.875 the usual ImageNet centre crop (timm's
  # crop_pct) that shows objects at the scale inception crops trained on.
  config.aug.eval_crop_fraction = 1.0
  # Test-time augmentation: evaluation and prediction average the logits of each image and
  # of its mirror image (timm's --tta 2 in spirit; twice the evaluation's compute). For
  # models trained with `flip`, to which both views are alike.
  config.aug.eval_flip = False
  config.aug.flip = False  # Random horizontal flip.
  config.aug.rotate = 0.0  # Max rotation as a fraction of a full turn (Keras RandomRotation).
  config.aug.zoom = 0.0  # Max zoom in/out (Keras RandomZoom height/width factor).
  config.aug.randaugment_layers = 0  # RandAugment: ops per image (0 = off).
  config.aug.randaugment_magnitude = 9  # RandAugment magnitude, 0..10.
  config.aug.mixup_alpha = 0.0
  config.aug.cutmix_alpha = 0.0
  config.aug.mix_prob = 1.0  # Probability that a batch is mixed at all.
  config.aug.mix_switch_prob = 0.5  # With both on: probability of cutmix over mixup.
  config.aug.random_erasing = 0.0  # Probability of erasing one rectangle per image.


def _model(config: ml_collections.ConfigDict) -> None:
  """Model."""
  config.model = ml_collections.ConfigDict()
  config.model.name = "ViT-Ti/4"  # See `vit_jax.models.list_models()`.
  # Every field of vit_jax.models.VisionTransformer, None = the registry entry's value,
  # e.g. --config.model.overrides.dropout_rate=0.1 or ...overrides.depth=6.
  config.model.overrides = model_overrides()
  # "bfloat16" on accelerators: parameters, optimiser state, LayerNorm statistics, softmax
  # and logits stay float32. float16 is refused: it needs loss scaling to train.
  config.compute_dtype = "float32"
  # How the layers are computed: "cpu" (hand-written CPU layers), "xla" (plain linen layers
  # and XLA's attention), "cudnn" (the same with cuDNN's fused attention; GPU, bfloat16) or
  # "auto" (cpu on CPU, cudnn on a GPU where it applies, else xla); the same parameters and
  # results every way (vit_jax/models/layers.py).
  config.kernels = "auto"


def _optimiser(config: ml_collections.ConfigDict) -> None:
  """Optimiser."""
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"  # "adamw" or "sgd" (momentum).
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  # "decoupled_lr": optax/Keras 3/PyTorch AdamW, decay multiplied by the current lr.
  # "decoupled": TF Addons AdamW (the origin example), decay NOT multiplied by the lr.
  config.optim.weight_decay_mode = "decoupled_lr"
  # Decay only kernels (dense/conv weights); biases, LayerNorm, pos_embedding and cls are
  # left alone. Set False to decay every parameter, as the Keras origin does.
  config.optim.decay_kernels_only = True
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  # Adam's first moment (SGD's momentum) in "bfloat16" halves its memory; the second
  # moment and the parameters stay float32.
  config.optim.mu_dtype = "float32"
  config.optim.momentum = 0.9  # SGD only.
  config.optim.schedule = "cosine"  # "cosine", "linear" (to 0) or "constant", after warmup.
  config.optim.warmup_steps = 0
  # > 0: the warmup in passes over the training split instead (set one of the two);
  # `resolve_steps` turns it into warmup_steps at the run's batch size, as num_epochs into
  # total_steps.
  config.optim.warmup_epochs = 0.0
  config.optim.end_lr_fraction = 0.0  # Cosine/linear end value as a fraction of lr.
  config.optim.grad_clip_norm = 0.0  # Global-norm clipping (0 = off).
  config.optim.accum_steps = 1  # Micro-batches per step: batch_size must divide by it.
  config.label_smoothing = 0.0
  # Weight EMA (0 = off): after every applied step ema += (1 - d_t) * (params - ema), with
  # d_t = min(ema_decay, (1 + t) / (10 + t)) at step t (the warm-up of TF's
  # ExponentialMovingAverage). The EMA is checkpointed beside the raw weights and is the
  # model the run delivers: eval/* and val/* score it (and pick the best checkpoint by
  # best_metric), eval_raw/* and val_raw/* the raw weights; --mode=eval/predict/export/
  # visualize and init_from use it. Changes the checkpoint's structure, like the optimiser.
  config.ema_decay = 0.0


def _run(config: ml_collections.ConfigDict) -> None:
  """Run."""
  config.seed = 0
  config.batch_size = 256  # Global batch over all devices and hosts.
  config.eval_batch_size = 256
  config.total_steps = 0  # 0 = derive from num_epochs.
  config.num_epochs = 1.0
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3  # Latest K checkpoints kept (the best is kept apart).
  # Metric that picks the best checkpoint: "top1", "top5" (higher is better) or "loss",
  # measured on val_split when it is set, else on eval_split; of the EMA weights when
  # ema_decay > 0.
  config.best_metric = "top1"
  config.fsdp = False  # Shard parameters and optimiser state over devices.
  config.remat = False  # Recompute block activations in the backward pass.
  config.scan_layers = False  # One compiled block scanned over depth (fast compiles).
  config.on_nonfinite = "stop"  # "stop" at a NaN/Inf loss, or "skip" the update.
  # XLA's persistent compilation cache: a rerun (resume, eval, bench) loads the compiled
  # steps instead of compiling them again. "" = off; $JAX_COMPILATION_CACHE_DIR wins.
  config.compilation_cache_dir = "~/.cache/vit_jax/xla"


def _fine_tuning(config: ml_collections.ConfigDict) -> None:
  """Fine-tuning."""
  # Parameters only, from: a workdir / checkpoint of ours, a published-format .npz, a
  # published checkpoint by name (vit_jax.models.hub.CHECKPOINTS, e.g. "augreg:ViT-B/16")
  # or by https:// URL, downloaded once into init_cache_dir; any path may be gs://...
  config.init_from = ml_collections.FieldReference(None, field_type=str)
  config.init_cache_dir = "~/.cache/vit_jax/checkpoints"
  config.init_head = "auto"  # "auto" (reset when the class count differs), "reset", "keep".
  config.init_pre_logits = "drop"  # "drop" or "keep" a checkpoint's pre_logits layer.
  config.freeze_backbone = False  # Linear probe: train the head only.
  config.layer_decay = 1.0  # Layer-wise lr decay factor (1.0 = off).
  config.backbone_lr_mult = 1.0  # Backbone lr as a fraction of the head's.


def _bench(config: ml_collections.ConfigDict) -> None:
  """Benchmark (--mode=bench)."""
  config.bench = ml_collections.ConfigDict()
  config.bench.warmup_steps = 2  # Untimed train steps after compilation.
  config.bench.steps = 10  # Timed train steps (the median is reported).
  config.bench.eval_steps = 5  # Timed eval steps (after one untimed).
  config.bench.input_batches = 20  # Batches through the real input pipeline (0 = skip).
  config.bench.matmul_size = 2048  # CPU peak: an f32 matmul of this size (0 = skip, no MFU).
  config.bench.matmul_reps = 10  # Timed matmuls (the median is the peak).


# VisionTransformer fields set from elsewhere: num_classes by the data, the rest by
# top-level keys (compute_dtype, scan_layers, remat, kernels).
_NOT_OVERRIDABLE = ("num_classes", "dtype", "scan_layers", "remat", "kernels")


def _field_type(annotation: str) -> type:
  for name, kind in (("Sequence", tuple), ("bool", bool), ("float", float), ("int", int),
                     ("str", str)):
    if name in annotation:
      return kind
  raise TypeError(f"No config type for a model field annotated {annotation!r}.")


def model_overrides() -> ml_collections.ConfigDict:
  """One typed, None-valued entry per VisionTransformer field (typed so the command line
  can set it)."""
  return ml_collections.ConfigDict({
      f.name: ml_collections.FieldReference(None, field_type=_field_type(str(f.type)))
      for f in dataclasses.fields(models.VisionTransformer)
      if f.name not in ("parent", "name", *_NOT_OVERRIDABLE)})


def steps_for_epochs(num_examples: int, batch_size: int, num_epochs: float) -> int:
  """Steps of `batch_size` that cover `num_epochs` passes over `num_examples`."""
  return max(1, round(num_examples * num_epochs / batch_size))


def resolve_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> None:
  """Sets total_steps (if 0) and warmup_steps (if warmup_epochs > 0) from epochs of the
  training split at the config's batch size: a --config.batch_size override moves both."""
  if not config.total_steps:
    config.total_steps = steps_for_epochs(num_train_examples, config.batch_size,
                                          config.num_epochs)
  if config.optim.warmup_epochs:
    config.optim.warmup_steps = steps_for_epochs(num_train_examples, config.batch_size,
                                                 config.optim.warmup_epochs)


# --- Validation --------------------------------------------------------------------------


_CHOICES = {
    "aug.normalize": ("dataset", "minus_one_one", "imagenet"),
    "aug.crop": ("none", "pad_crop", "inception"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.weight_decay_mode": ("decoupled_lr", "decoupled"),
    "compute_dtype": ("float32", "bfloat16"),
    "optim.mu_dtype": ("float32", "bfloat16"),
    "kernels": models.KERNELS,
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
    "input.worker_count": (0, None, " (0 = in the training process)"),
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
    "ema_decay": (0, True, 1, False),
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
_BOOLS = ("aug.flip", "aug.eval_flip", "optim.decay_kernels_only", "fsdp", "remat", "scan_layers",
          "freeze_backbone")
_STRINGS = ("dataset", "train_split", "eval_split", "model.name", "init_cache_dir")
_OPTIONAL_STRINGS = ("data_dir", "manual_dir", "val_split", "init_from")
# Model fields (config.model.overrides.*) with a range other than their type's default.
_MODEL_CHOICES = {"pool": models.POOLS, "posemb": models.POSEMBS}
# 0 = no pre_logits layer / no register tokens / no stem; other integer fields >= 1.
_MODEL_INT_MINIMUM = {"representation_size": 0, "num_registers": 0, "stem_features": 0}


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _fail(key: str, value, allowed: str) -> errors.ConfigError:
  return errors.ConfigError(f"config.{key}={value!r} is not allowed: {allowed}.")


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
      raise errors.ConfigError(f"config.{key} is not a field of the model: use one of "
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


def published_model(init_from: str | None) -> tuple[str, dict] | None:
  """(registry name, field overrides) that reproduce the published checkpoint `init_from`
  names (e.g. "augreg:ViT-B/16"); None when it is not a name. For recipes."""
  if not init_from or not hub.is_name(init_from):
    return None
  try:
    entry = hub.lookup(init_from)
  except errors.MissingCheckpointError as e:
    raise errors.ConfigError(str(e)) from None
  return entry.model, dict(entry.fields)


def model_fields(config: ml_collections.ConfigDict) -> dict:
  """The VisionTransformer fields config.model builds: defaults, the registry entry's,
  then the overrides."""
  defaults = {f.name: f.default for f in dataclasses.fields(models.VisionTransformer)}
  return {**defaults, **models.get_spec(config.model.name).fields,
          **{k: v for k, v in config.model.overrides.items() if v is not None}}


def _check_published(config: ml_collections.ConfigDict) -> None:
  """A published checkpoint by name needs the model that reproduces its function."""
  model_name, needs = published_model(config.init_from)
  overrides = {k: v for k, v in config.model.overrides.items() if v is not None}
  architecture = models.get_spec(model_name).fields
  clashing = [k for k, v in overrides.items() if k in architecture and v != architecture[k]]
  defaults = {f.name: f.default for f in dataclasses.fields(models.VisionTransformer)}
  after = {**defaults, **architecture, **overrides}
  flags = [f"--config.model.overrides.{k}={v}" for k, v in needs.items() if after[k] != v]
  if config.model.name != model_name:
    flags.insert(0, f"--config.model.name={model_name}")
  if not flags and not clashing:
    return
  held = ", ".join(f"{k}={v!r}" for k, v in needs.items())
  fixes = ([f"set {' '.join(flags)}"] if flags else []) + (
      [f"leave config.model.overrides.{{{','.join(clashing)}}} unset"] if clashing else [])
  raise errors.ConfigError(
      f"config.init_from={config.init_from!r} holds a {model_name}"
      f"{f' with {held}' if held else ''}: {' and '.join(fixes)} (or give its URL or path "
      "to load it into another model).")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError naming the key, its value and what is allowed."""
  if config.compute_dtype == "float16":
    raise _fail("compute_dtype", "float16", "float16 training needs dynamic loss scaling, "
                "which vit_jax does not do; use 'bfloat16' (float32's range, the same speed "
                "on current GPUs and TPUs) or 'float32'")
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
    raise errors.ConfigError(f"config.model.name={config.model.name!r} is not a registered "
                             f"model: use one of {models.list_models()}.")
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
  _check_combinations(config)


def _check_combinations(config: ml_collections.ConfigDict) -> None:
  """Keys that are each allowed but not together."""
  if config.total_steps == 0 and config.num_epochs == 0:
    raise errors.ConfigError("config.total_steps=0 and config.num_epochs=0: set one of them "
                             "> 0.")
  if config.optim.warmup_steps and config.optim.warmup_epochs:
    raise errors.ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps} and "
                             f"config.optim.warmup_epochs={config.optim.warmup_epochs}: set "
                             "one of them, the other to 0.")
  if config.batch_size % config.optim.accum_steps:
    raise errors.ConfigError(f"config.batch_size={config.batch_size} must divide by "
                             f"config.optim.accum_steps={config.optim.accum_steps}.")
  fields = model_fields(config)
  patch = fields["patch_size"]
  if config.image_size % patch:
    raise errors.ConfigError(
        f"config.image_size={config.image_size} is not divisible by the patch size {patch} "
        f"of {config.model.name}: use a multiple of {patch}, e.g. "
        f"{max(patch, config.image_size // patch * patch)}.")
  if fields.get("pool", "token") == "token" and not fields.get("class_token", True):
    raise errors.ConfigError("config.model.overrides.pool='token' needs class_token=True: "
                             "set config.model.overrides.pool to 'gap', 'map' or 'flatten', "
                             "or class_token to True.")
  if fields.get("posemb") == "sincos2d" and (fields["width"] % 4 or fields["width"] < 8):
    raise errors.ConfigError(f"config.model.overrides.posemb='sincos2d' needs a width that is "
                             f"a multiple of 4 and >= 8, not {fields['width']}.")
  if config.kernels == "cudnn":
    head_dim = fields.get("head_dim") or fields["width"] // fields["num_heads"]
    problem = models.cudnn_attention_problem(config.compute_dtype, head_dim)
    if problem:
      raise errors.ConfigError(f"config.kernels='cudnn' cannot run {config.model.name}: "
                               f"{problem}. Use config.kernels='auto'.")
  if config.init_from and hub.is_name(config.init_from):
    _check_published(config)
  if config.dataset == "folder" and not config.data_dir:
    raise errors.ConfigError("config.dataset='folder' needs config.data_dir=/path/to/images "
                             "with train/CLASS/*.jpg and test/CLASS/*.jpg.")
