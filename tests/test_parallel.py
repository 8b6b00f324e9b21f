"""parallel: pacing the host. XLA's CPU client deadlocks (and aborts the process 40 s later)
when the host dispatches more than 32 multi-device programs with collectives ahead of 8
simulated devices; DispatchLimit keeps it a few steps ahead."""
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import parallel
from vit_jax.train import metrics, steps

# Far more steps than the 32 unfinished programs per device XLA's CPU client admits.
NUM_STEPS = 300


def test_dispatch_limit_waits_for_the_oldest_step_only(monkeypatch):
  waited = []
  monkeypatch.setattr(jax, "block_until_ready", waited.append)
  limit = parallel.DispatchLimit(steps_ahead=3)
  for step in range(1, 7):
    limit.add(step)
  assert waited == [1, 2, 3]


def _collective_setup():
  """A step with an all-reduce over the 8 devices (a batch-sharded input, a replicated
  sum): the kind of program whose unbounded run-ahead deadlocked."""
  assert jax.device_count() == 8
  mesh = parallel.make_mesh()
  w = jax.device_put(jnp.full((128, 128), 1 / 128, jnp.float32), parallel.replicated(mesh))
  x = jax.device_put(jnp.ones((512, 128), jnp.float32), parallel.batch_sharding(mesh))
  return mesh, w, x


def test_paced_collective_steps_run_to_the_end():
  _, w, x = _collective_setup()
  step = jax.jit(lambda w, x: jnp.sum(jnp.tanh(x @ w) @ w))
  limit = parallel.DispatchLimit()
  outputs = []
  for _ in range(NUM_STEPS):
    outputs.append(step(w, x))
    limit.add(outputs[-1])
  expected = 512 * 128 * np.tanh(1.0)
  np.testing.assert_allclose(jax.device_get(outputs), [expected] * NUM_STEPS, rtol=1e-5)


def test_eval_totals_over_many_batches_count_every_example_once():
  mesh, _, _ = _collective_setup()
  batch_size, num_classes = 64, 10
  rng = np.random.default_rng(0)
  kernel = jax.device_put(jnp.asarray(rng.normal(size=(16, num_classes)), jnp.float32),
                          parallel.replicated(mesh))
  features = rng.normal(size=(NUM_STEPS, batch_size, 16)).astype(np.float32)
  labels = rng.integers(0, num_classes, (NUM_STEPS, batch_size)).astype(np.int32)
  masks = rng.random((NUM_STEPS, batch_size)) < 0.9
  sharded = parallel.batch_sharding(mesh)
  batches = [{"x": jax.device_put(features[i], sharded),
              "label": jax.device_put(labels[i], sharded),
              "mask": jax.device_put(masks[i], sharded)} for i in range(NUM_STEPS)]
  eval_step = jax.jit(lambda params, b: metrics.eval_sums(b["x"] @ params, b["label"], b["mask"]),
                      out_shardings=parallel.replicated(mesh))
  totals = steps.eval_totals(eval_step, kernel, batches)
  logits = features @ np.asarray(kernel)
  top1 = (logits.argmax(-1) == labels) & masks
  assert int(totals["count"]) == int(masks.sum())
  assert int(totals["top1_sum"]) == int(top1.sum())
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels[masks], logits.argmax(-1)[masks]), 1)
  np.testing.assert_array_equal(totals["confusion"], confusion)
