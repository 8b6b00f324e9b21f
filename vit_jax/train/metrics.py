"""Loss, top-k accuracy and exact masked evaluation sums.

Top-k definition (exact, deterministic): the label counts as in the top k when it is among
the indices returned by `jax.lax.top_k(logits, k)`, which orders equal logits by lower
class index first. Equivalently, with r = #classes whose logit is strictly larger than the
label's + #classes with an equal logit and a smaller index, the label is in the top k iff
r < k. So ties are broken towards the lower class index, not in the label's favour.
k larger than the number of classes K is clipped to K (every label is then correct).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum_k targets_k * log_softmax(logits)_k, in float32.

  `targets` are [B, K] probabilities (label smoothing / mixup are applied upstream).
  The float32 cast matters for bfloat16 logits: log_softmax in bf16 loses ~3 digits.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] bool: label among the top min(k, K) classes (ties: see the module docstring)."""
  _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
  return jnp.any(top == labels[:, None], axis=-1)


def eval_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sums over the rows where `mask` is true, to be added across batches and devices.

  Padding rows are excluded with `where`, so even NaN/Inf logits there cannot leak in.
  Counts are int32, hence exact under addition; the loss is plain cross-entropy against
  the one-hot labels (no smoothing). "confusion" is the K x K confusion matrix: [true
  class, top-1 class] counts, its diagonal summing to "top1_sum".
  """
  mask = mask.astype(bool)
  num_classes = logits.shape[-1]
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  loss = cross_entropy(logits, one_hot)
  _, top1 = jax.lax.top_k(logits, 1)  # The top-1 class as `topk_correct` breaks ties.

  def count(x: jax.Array) -> jax.Array:
    return jnp.sum(x & mask, dtype=jnp.int32)

  return {
      "loss_sum": jnp.sum(jnp.where(mask, loss, 0.0)),
      "top1_sum": count(topk_correct(logits, labels, 1)),
      "top5_sum": count(topk_correct(logits, labels, 5)),
      "count": jnp.sum(mask, dtype=jnp.int32),
      "confusion": jnp.zeros((num_classes, num_classes), jnp.int32).at[
          labels, top1[:, 0]].add(mask.astype(jnp.int32)),
  }


def finalize_eval(sums: Mapping[str, jax.Array | np.ndarray | float | int]) -> dict[str, float | int]:
  """Means from summed `eval_sums` results, as python numbers for logging."""
  count = int(sums["count"])
  if count == 0:
    raise ValueError("finalize_eval: no evaluation examples were counted (empty split?).")
  return {
      "eval/loss": float(sums["loss_sum"]) / count,
      "eval/top1": int(sums["top1_sum"]) / count,
      "eval/top5": int(sums["top5_sum"]) / count,
      "eval/num_examples": count,
  }


def per_class(confusion_KxK: np.ndarray, class_names: Sequence[str]) -> list[dict]:
  """Per true class (a row of the confusion matrix of `eval_sums`): its name, examples,
  correct top-1 predictions and accuracy (None for a class without examples)."""
  confusion_KxK = np.asarray(confusion_KxK, np.int64)
  if confusion_KxK.shape != (len(class_names), len(class_names)):
    raise ValueError(f"A {confusion_KxK.shape} confusion matrix for {len(class_names)} "
                     "class names.")
  rows = []
  for k, name in enumerate(class_names):
    examples, correct = int(confusion_KxK[k].sum()), int(confusion_KxK[k, k])
    rows.append({"class": name, "examples": examples, "correct": correct,
                 "accuracy": correct / examples if examples else None})
  return rows
