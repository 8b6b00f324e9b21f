"""Defaults shared by every recipe: each config file starts from `get_base_config()`.

Every key a recipe may set lives here, so `--config.KEY=VALUE` overrides are checked
against one list (ml_collections refuses unknown keys) and the code never needs
`config.get(key, default)`.
"""
import dataclasses

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- Data -------------------------------------------------------------------
  # A TFDS dataset name (cifar100, fashion_mnist, imagenet2012, ...) or "folder":
  # images in `data_dir/{train_split,eval_split}/CLASS/*.{jpg,png}`.
  config.dataset = "cifar100"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir, or the image folder.
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)  # Already-downloaded source files.
  config.train_split = "train"
  config.eval_split = "test"
  # Optional held-out split (e.g. "train[90%:]"): evaluated every eval_every_steps,
  # picks the best checkpoint, and the eval_split is then scored with that checkpoint.
  config.val_split = ml_collections.FieldReference(None, field_type=str)
  config.image_size = 32  # The model's input resolution (batches are resized on device).
  # Folder datasets are decoded and resized to this size on the host (0 = image_size).
  config.load_size = 0

  # --- Augmentation (batched, on the device, inside the jitted train step) ----------
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

  # --- Model -----------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = "ViT-Ti/4"  # See `vit_jax.models.list_models()`.
  # Every field of vit_jax.models.VisionTransformer, None = the registry entry's value,
  # e.g. --config.model.overrides.dropout_rate=0.1 or ...overrides.depth=6.
  config.model.overrides = model_overrides()
  config.compute_dtype = "float32"  # "bfloat16" on accelerators; parameters stay float32.

  # --- Optimiser ---------------------------------------------------------------
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
  config.optim.momentum = 0.9  # SGD only.
  config.optim.schedule = "cosine"  # "cosine", "linear" (to 0) or "constant", after warmup.
  config.optim.warmup_steps = 0
  # > 0: the warmup in passes over the training split instead (set one of the two); train.py
  # turns it into warmup_steps with the run's batch size, as num_epochs into total_steps.
  config.optim.warmup_epochs = 0.0
  config.optim.end_lr_fraction = 0.0  # Cosine/linear end value as a fraction of lr.
  config.optim.grad_clip_norm = 0.0  # Global-norm clipping (0 = off).
  config.optim.accum_steps = 1  # Micro-batches per step: batch_size must divide by it.
  config.label_smoothing = 0.0

  # --- Run -------------------------------------------------------------------
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
  # measured on val_split when it is set, else on eval_split.
  config.best_metric = "top1"
  config.fsdp = False  # Shard parameters and optimiser state over devices.
  config.remat = False  # Recompute block activations in the backward pass.
  config.scan_layers = False  # One compiled block scanned over depth (fast compiles).
  config.on_nonfinite = "stop"  # "stop" at a NaN/Inf loss, or "skip" the update.
  # XLA's persistent compilation cache: a rerun (resume, eval, bench) loads the compiled
  # steps instead of compiling them again. "" = off; $JAX_COMPILATION_CACHE_DIR wins.
  config.compilation_cache_dir = "~/.cache/vit_jax/xla"

  # --- Fine-tuning -------------------------------------------------------------
  # A workdir / orbax checkpoint of ours or a published-format .npz; parameters only.
  config.init_from = ml_collections.FieldReference(None, field_type=str)
  config.init_head = "auto"  # "auto" (reset when the class count differs), "reset", "keep".
  config.init_pre_logits = "drop"  # "drop" or "keep" a checkpoint's pre_logits layer.
  config.freeze_backbone = False  # Linear probe: train the head only.
  config.layer_decay = 1.0  # Layer-wise lr decay factor (1.0 = off).
  config.backbone_lr_mult = 1.0  # Backbone lr as a fraction of the head's.

  # --- Benchmark (--mode=bench) -------------------------------------------------
  config.bench = ml_collections.ConfigDict()
  config.bench.warmup_steps = 2  # Untimed train steps after compilation.
  config.bench.steps = 10  # Timed train steps (the median is reported).
  config.bench.eval_steps = 5  # Timed eval steps (after one untimed).
  config.bench.input_batches = 20  # Batches through the real input pipeline (0 = skip).
  config.bench.matmul_size = 2048  # CPU peak: an f32 matmul of this size (0 = skip, no MFU).
  config.bench.matmul_reps = 10  # Timed matmuls (the median is the peak).
  return config


# VisionTransformer fields set from elsewhere: num_classes by the data, the rest by
# top-level keys (compute_dtype, scan_layers, remat).
_NOT_OVERRIDABLE = ("num_classes", "dtype", "scan_layers", "remat")


def _field_type(annotation: str) -> type:
  for name, kind in (("Sequence", tuple), ("bool", bool), ("float", float), ("int", int),
                     ("str", str)):
    if name in annotation:
      return kind
  raise TypeError(f"No config type for a model field annotated {annotation!r}.")


def model_overrides() -> ml_collections.ConfigDict:
  """One typed, None-valued entry per VisionTransformer field (typed so the command line
  can set it)."""
  from vit_jax import models  # Configs import the model only for its field list.
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
