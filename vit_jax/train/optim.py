"""Learning-rate schedule, optimiser, fine-tuning lr multipliers and gradient accumulation.

Weight decay (`config.optim.weight_decay` = wd, lr_t = the schedule's value at step t,
u_t = the optimiser's direction, e.g. Adam's m_hat / (sqrt(v_hat) + eps)):

* AdamW, `weight_decay_mode="decoupled_lr"` (optax.adamw, Keras 3, PyTorch AdamW):
    w_{t+1} = w_t - lr_t * (u_t + wd * w_t)
  The decay follows the lr schedule (zero during the first warmup step, small at the end).
* AdamW, `weight_decay_mode="decoupled"` (TF Addons AdamW, used by the original Keras
  example):
    w_{t+1} = w_t - lr_t * u_t - wd * w_t
  The decay is NOT multiplied by the lr, nor by the schedule: TFA only scheduled wd when
  wd itself was given as a schedule, and the Keras example passed a constant, so wd * w
  is applied unscaled at every step, warmup included. Typical wd values are therefore
  ~lr times smaller than in "decoupled_lr" mode (1e-4 here vs 0.05 there).
* SGD: classic L2 regularisation (PyTorch SGD's weight_decay): wd * w is added to the
  gradient before momentum, then the whole thing is multiplied by lr_t:
    b_{t+1} = momentum * b_t + (g_t + wd * w_t);  w_{t+1} = w_t - lr_t * b_{t+1}
  `weight_decay_mode` does not apply to SGD.

`decay_kernels_only=True` decays only leaves named "kernel" (dense, conv and attention
weights; see `weight_decay_mask`); False decays every parameter, as the Keras origin does.

Order of the update: global-norm clipping of the raw gradient, the optimiser (with its
weight decay), then the per-parameter lr multipliers (`backbone_lr_mult`, `layer_decay`)
scale the finished update, decay term included. Scaling the decay with the multiplier
matches timm/BEiT param groups with per-group lr, and keeps a layer whose lr is scaled
down from being pulled to zero by full-strength decay (in "decoupled" mode too).
With `freeze_backbone`, everything but the head gets a zero update and no optimiser state.

Steps are counted as in optax: the n-th update (n = 0, 1, ...) uses `schedule(n)`, so with
warmup the first update has lr 0; the train loop should log `schedule(step)` as train/lr
for the update it applies at `step`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

PyTree = Any
# (params, microbatch, micro_index) -> ((loss, aux), grads)
LossAndGradFn = Callable[[PyTree, PyTree, jax.Array], tuple[tuple[jax.Array, PyTree], PyTree]]

# Top-level parameter names that make up the classification head: trained with
# freeze_backbone, never scaled by backbone_lr_mult, and in the top layer for layer_decay.
# The hidden head layers are new (published checkpoints have none), so they train too.
_HEAD_NAMES = re.compile(r"head|pre_logits|head_hidden_\d+")
_BLOCK = re.compile(r"encoderblock_(\d+)")


def _names(path: jax.tree_util.KeyPath) -> list[str]:
  """["Transformer", "encoderblock_0", ..., "kernel"] for a tree_map_with_path path."""
  return jax.tree_util.keystr(path, simple=True, separator="/").split("/")


# --- Schedule ------------------------------------------------------------------------


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr at a step: linear warmup 0 -> lr, then cosine / linear decay or constant.

  Cosine and linear go from lr at `warmup_steps` to `end_lr_fraction * lr` at
  `total_steps` and stay there afterwards.
  """
  opt = config.optim
  total, warmup = config.total_steps, opt.warmup_steps
  if total <= 0:
    raise ValueError(f"config.total_steps must be resolved to a positive number of steps "
                     f"before building the schedule, got {total}.")
  if warmup < 0:
    raise ValueError(f"config.optim.warmup_steps={warmup} must be >= 0.")
  if opt.schedule not in ("cosine", "linear", "constant"):
    raise ValueError(f"config.optim.schedule={opt.schedule!r}: expected 'cosine', 'linear' "
                     "or 'constant'.")
  peak, end = opt.lr, opt.lr * opt.end_lr_fraction

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    # A short run (total_steps <= warmup_steps, e.g. a smoke test) is all warmup.
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    if opt.schedule == "cosine":
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif opt.schedule == "linear":
      after = peak + (end - peak) * progress
    else:
      after = jnp.full_like(progress, peak)
    return jnp.where(step < warmup, peak * step / max(warmup, 1), after)

  return schedule


# --- Weight decay --------------------------------------------------------------------


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for leaves named "kernel" (dense/conv/attention weights), False elsewhere.

  Biases, LayerNorm scale/bias, pos_embedding and cls are not decayed. A callable rather
  than a fixed tree so it also applies to the partial trees inside optax.multi_transform.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _names(path)[-1] == "kernel",
                                          params)


def _base_optimizer(config: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW or SGD with weight decay, as described in the module docstring."""
  opt = config.optim
  mask = weight_decay_mask if opt.decay_kernels_only else None
  mu_dtype = jnp.dtype(opt.mu_dtype)
  if opt.name == "sgd":
    return optax.chain(optax.add_decayed_weights(opt.weight_decay, mask),
                       optax.sgd(schedule, momentum=opt.momentum or None, nesterov=False,
                                 accumulator_dtype=mu_dtype))
  if opt.name != "adamw":
    raise ValueError(f"config.optim.name={opt.name!r}: expected 'adamw' or 'sgd'.")
  if opt.weight_decay_mode == "decoupled_lr":
    return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, mu_dtype=mu_dtype,
                       weight_decay=opt.weight_decay, mask=mask)
  if opt.weight_decay_mode == "decoupled":
    # Descent direction lr_t * u_t + wd * w, negated last: the decay skips the lr scaling.
    return optax.chain(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                           mu_dtype=mu_dtype),
                       optax.scale_by_learning_rate(schedule, flip_sign=False),
                       optax.add_decayed_weights(opt.weight_decay, mask),
                       optax.scale(-1.0))
  raise ValueError(f"config.optim.weight_decay_mode={opt.weight_decay_mode!r}: expected "
                   "'decoupled_lr' or 'decoupled'.")


# --- Fine-tuning: lr multipliers and freezing ----------------------------------------


def _is_head(names: list[str]) -> bool:
  return bool(_HEAD_NAMES.fullmatch(names[0]))


def _num_layers(params: PyTree) -> int:
  """Encoder depth, from `encoderblock_{i}` names or the leading axis of a scanned stack."""
  depth = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    for name in _names(path):
      if name == "encoderblock":
        return leaf.shape[0]
      if match := _BLOCK.fullmatch(name):
        depth = max(depth, int(match.group(1)) + 1)
  return depth


def _layer_ids(names: list[str], ndim: int, num_layers: int) -> int | np.ndarray:
  """BEiT/MAE layer id: 0 for the embeddings, i + 1 for block i, L + 1 for the top.

  A scanned stack gets one id per slice of its leading (depth) axis, shaped to broadcast.
  """
  if (names[0] in ("stem", "embedding", "cls", "registers")
      or names[:2] == ["Transformer", "posembed_input"]):
    return 0
  # The MAP pooling head (pool="map") reads the encoder's output: with the top, as timm
  # groups its attn_pool.
  if (_is_head(names) or names[0].startswith("MAPHead")
      or names[:2] == ["Transformer", "encoder_norm"]):
    return num_layers + 1
  if names[:2] == ["Transformer", "encoderblock"]:
    return np.arange(1, num_layers + 1).reshape((num_layers,) + (1,) * (ndim - 1))
  if len(names) > 1 and (match := _BLOCK.fullmatch(names[1])):
    return int(match.group(1)) + 1
  raise ValueError(f"config.layer_decay: no layer id for parameter {'/'.join(names)}.")


def _scale_updates_per_leaf(config: ml_collections.ConfigDict,
                            num_layers: int) -> optax.GradientTransformation:
  """Multiplies each leaf's update by backbone_lr_mult (backbone only) * layer-decay scale."""

  def multiplier(names: list[str], ndim: int) -> float | np.ndarray:
    mult = 1.0 if _is_head(names) else config.backbone_lr_mult
    if config.layer_decay != 1.0:
      layer_id = _layer_ids(names, ndim, num_layers)
      mult = mult * config.layer_decay ** (num_layers + 1 - layer_id)
    return mult

  def scale(updates: PyTree, params: PyTree) -> PyTree:
    del params  # The multiplier depends on the name only.
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(multiplier(_names(path), u.ndim), u.dtype), updates)

  return optax.stateless(scale)


def _freeze_labels(params: PyTree) -> PyTree:
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if _is_head(_names(path)) else "frozen", params)
  if "train" not in jax.tree_util.tree_leaves(labels):
    raise ValueError("config.freeze_backbone=True but the parameters have no top-level "
                     "'head' / 'pre_logits' / 'head_hidden_*' entry (pass the bare params "
                     "collection, not {'params': ...}).")
  return labels


def make_optimizer(config: ml_collections.ConfigDict,
                   params: PyTree) -> optax.GradientTransformation:
  """The full update rule: clip -> optimiser with weight decay -> lr multipliers -> freeze."""
  parts = []
  if config.optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.optim.grad_clip_norm))
  parts.append(_base_optimizer(config, make_schedule(config)))
  if config.layer_decay != 1.0 or config.backbone_lr_mult != 1.0:
    parts.append(_scale_updates_per_leaf(config, _num_layers(params)))
  tx = optax.chain(*parts)
  if config.freeze_backbone:
    # Inside multi_transform the clipping norm covers the trained (head) gradients only,
    # and the frozen leaves carry no Adam moments.
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, _freeze_labels)
  return tx


# --- Gradient accumulation -----------------------------------------------------------


def _split_microbatches(batch: PyTree, accum_steps: int) -> PyTree:
  """[B, ...] -> [accum_steps, B // accum_steps, ...], micro-batch j = rows j::accum_steps.

  Strided rather than contiguous micro-batches: with the batch axis sharded over devices,
  reshaping to [B // accum_steps, accum_steps] keeps every micro-batch spread over all
  devices with no data movement (when the per-device batch divides by accum_steps).
  """

  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % accum_steps:
      raise ValueError(f"Batch of {x.shape[0]} rows does not split into "
                       f"config.optim.accum_steps={accum_steps} micro-batches.")
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(loss_and_grad_fn: LossAndGradFn, params: PyTree, batch: PyTree,
                         accum_steps: int) -> tuple[tuple[jax.Array, PyTree], PyTree]:
  """((loss, aux), grads) averaged over `accum_steps` micro-batches of `batch`.

  For a loss that is a mean over examples this equals the full-batch result, while only
  one micro-batch's activations are live at a time (jax.lax.scan). `micro_index` lets the
  loss fold distinct dropout/augmentation keys per micro-batch; it is 0 without splitting.
  """
  if accum_steps == 1:
    return loss_and_grad_fn(params, batch, jnp.zeros((), jnp.int32))
  micro = _split_microbatches(batch, accum_steps)

  def step(total: PyTree, xs: tuple[PyTree, jax.Array]) -> tuple[PyTree, None]:
    out = loss_and_grad_fn(params, *xs)
    return jax.tree_util.tree_map(jnp.add, total, out), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  shapes = jax.eval_shape(loss_and_grad_fn, params, first, jnp.zeros((), jnp.int32))
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(step, zeros, (micro, jnp.arange(accum_steps, dtype=jnp.int32)))
  return jax.tree_util.tree_map(lambda x: x / accum_steps, total)
