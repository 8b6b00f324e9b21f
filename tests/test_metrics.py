"""Cross-entropy, top-k with ties, exact masked eval sums, the train-metric mean."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.train import metrics


def test_cross_entropy_one_hot_is_minus_log_softmax():
  logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 10.0]], np.float32)
  targets = np.eye(3, dtype=np.float32)[[0, 2]]
  x = logits.astype(np.float64)
  log_softmax = x - np.log(np.exp(x).sum(-1, keepdims=True))
  # float32 resolves log-probabilities near 0 to about one ulp of the logits (1e-6 at 10).
  np.testing.assert_allclose(metrics.cross_entropy(logits, targets),
                             [-log_softmax[0, 0], -log_softmax[1, 2]], rtol=1e-6, atol=2e-6)


def test_cross_entropy_soft_targets_and_bfloat16_logits():
  logits = np.array([[0.5, -1.0, 2.0]], np.float32)
  targets = np.array([[0.1, 0.3, 0.6]], np.float32)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(targets * log_softmax).sum(-1)
  np.testing.assert_allclose(metrics.cross_entropy(logits, targets), expected, rtol=1e-6)
  # These logits are exact in bfloat16; the loss comes back in float32 with full accuracy.
  loss = metrics.cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_topk_ties_go_to_the_lower_class_index():
  logits = np.array([[1.0, 5.0, 5.0, 0.0],   # tie between classes 1 and 2 at the top
                     [1.0, 5.0, 5.0, 0.0],
                     [2.0, 2.0, 2.0, 2.0],   # all equal: rank = class index
                     [2.0, 2.0, 2.0, 2.0]], np.float32)
  labels = np.array([1, 2, 1, 3])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 1),
                                [True, False, False, False])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 2),
                                [True, True, True, False])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 3),
                                [True, True, True, False])


def test_topk_with_k_above_the_class_count_is_clipped():
  logits = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
  labels = np.array([2, 0])  # both ranked last
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 5), [True, True])
  np.testing.assert_array_equal(metrics.topk_correct(logits, labels, 2), [False, False])


def test_eval_sums_ignore_padding_exactly_and_add_up():
  logits = np.array([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 3.0, 0.0, 0.0, 0.0, 0.0],
                     [np.nan, np.inf, 0.0, 0.0, 0.0, 0.0],   # padding row with garbage
                     [1.0, 0.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
  labels = np.array([1, 1, 0, 0])
  mask = np.array([True, True, False, True])
  sums = jax.jit(metrics.eval_sums)(logits, labels, mask)
  valid = logits[mask]
  log_softmax = valid - np.log(np.exp(valid).sum(-1, keepdims=True))
  expected_loss = -log_softmax[np.arange(3), labels[mask]].sum()
  np.testing.assert_allclose(sums["loss_sum"], expected_loss, rtol=1e-6)
  # Row 0: label 1 is 2nd (top-5 only); row 1: top-1; row 3: label 0 is 5th of 6 (top-5).
  assert (int(sums["top1_sum"]), int(sums["top5_sum"]), int(sums["count"])) == (1, 3, 3)
  assert sums["count"].dtype == jnp.int32 and sums["top1_sum"].dtype == jnp.int32

  # Two batches (the second one all padding) add up to the same sums.
  second = metrics.eval_sums(logits, labels, np.zeros(4, bool))
  total = jax.tree_util.tree_map(lambda a, b: a + b, sums, second)
  assert metrics.finalize_eval(total) == metrics.finalize_eval(sums)


def test_finalize_eval_values():
  result = metrics.finalize_eval({"loss_sum": np.float32(6.0), "top1_sum": np.int32(3),
                                  "top5_sum": np.int32(4), "count": np.int32(4)})
  assert result == {"eval/loss": 1.5, "eval/top1": 0.75, "eval/top5": 1.0,
                    "eval/num_examples": 4}
  assert type(result["eval/num_examples"]) is int and type(result["eval/loss"]) is float
  with pytest.raises(ValueError, match="no evaluation examples"):
    metrics.finalize_eval({"loss_sum": 0.0, "top1_sum": 0, "top5_sum": 0, "count": 0})


def test_confusion_matrix_counts_every_unmasked_row_once():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(40, 4)).astype(np.float32)
  logits[5] = [1.0, 3.0, 3.0, 0.0]  # A tie: the lower class (1) is the top-1, as top_k says.
  labels = rng.integers(0, 4, 40)
  labels[5] = 2
  mask = rng.random(40) < 0.8
  mask[5] = True
  logits[~mask] = np.nan  # Padding rows with garbage: never counted.
  sums = jax.jit(metrics.eval_sums)(logits, labels, mask)
  predicted = np.where(np.isnan(logits).any(-1), 0, np.argmax(np.nan_to_num(logits), -1))
  expected = np.zeros((4, 4), np.int64)
  np.add.at(expected, (labels[mask], predicted[mask]), 1)
  assert expected[2, 1] >= 1  # The tie went to class 1.
  np.testing.assert_array_equal(sums["confusion"], expected)
  assert sums["confusion"].dtype == jnp.int32
  assert int(np.trace(sums["confusion"])) == int(sums["top1_sum"])
  assert int(np.sum(sums["confusion"])) == int(sums["count"]) == int(mask.sum())

  rows = metrics.per_class(sums["confusion"], ["a", "b", "c", "d"])
  assert [r["class"] for r in rows] == ["a", "b", "c", "d"]
  assert [r["examples"] for r in rows] == [int((labels[mask] == k).sum()) for k in range(4)]
  for k, row in enumerate(rows):
    on_class = mask & (labels == k)
    assert row["correct"] == int((predicted[on_class] == k).sum())
    assert row["accuracy"] == row["correct"] / row["examples"]


def test_per_class_of_a_class_without_examples_and_a_wrong_shape():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])
  assert metrics.per_class(confusion, ["x", "y", "z"]) == [
      {"class": "x", "examples": 4, "correct": 3, "accuracy": 0.75},
      {"class": "y", "examples": 0, "correct": 0, "accuracy": None},
      {"class": "z", "examples": 6, "correct": 4, "accuracy": 4 / 6}]
  with pytest.raises(ValueError, match=r"^A \(3, 3\) confusion matrix for 2 class names\.$"):
    metrics.per_class(confusion, ["x", "y"])
