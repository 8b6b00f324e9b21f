"""steps.py: the weight EMA of the train step against a numpy reference; a skipped step
leaves it alone; a run without EMA keeps the train state (and checkpoints) it had."""
import jax
import jax.numpy as jnp
import numpy as np
import step_kit

from vit_jax import config as config_lib
from vit_jax.train import steps

SHAPE = (8, 8, 1)


def _built(ema_decay: float):
  config = config_lib.get_base_config()
  config.model.overrides.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
  config.image_size, config.batch_size, config.total_steps = 8, 8, 10
  config.optim.lr, config.optim.warmup_steps = 0.01, 0
  config.ema_decay = ema_decay
  return step_kit.build_step(config, SHAPE)


def _batch(mesh, seed):
  return step_kit.random_batch(mesh, seed, 8, SHAPE)


def _host(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_ema_follows_a_numpy_reference_and_a_skipped_step_leaves_it():
  decay = 0.6  # Below the warm-up's (1 + t) / (10 + t) from step t = 4 on: both parts used.
  mesh, state, step = _built(decay)
  reference = _host(state.params)
  for got, want in zip(_host(state.ema_params), reference, strict=True):
    np.testing.assert_array_equal(got, want)  # The EMA starts at the initial weights.
  for t in range(6):
    state, metrics = step(state, _batch(mesh, t))
    assert bool(metrics["finite"])
    d = np.minimum(np.float32(decay), np.float32(1 + t) / np.float32(10 + t))
    reference = [e + (np.float32(1) - d) * (p - e)
                 for e, p in zip(reference, _host(state.params), strict=True)]
    for got, want in zip(_host(state.ema_params), reference, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  raw, ema = _host(state.params), _host(state.ema_params)
  assert max(np.abs(r - e).max() for r, e in zip(raw, ema)) > 1e-4  # An average, not a copy.

  # A NaN in the weights makes the loss non-finite: the update is dropped, and the EMA
  # does not move towards anything.
  poisoned = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params)
  after, metrics = step(state.replace(params=poisoned), _batch(mesh, 9))
  assert not bool(metrics["finite"]) and int(after.step) == 7
  for got, want in zip(_host(after.ema_params), ema, strict=True):
    np.testing.assert_array_equal(got, want)


def test_without_ema_the_state_has_no_ema_leaves():
  mesh, state, step = _built(0.0)
  state, _ = step(state, _batch(mesh, 0))
  assert state.ema_params is None
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert not any("ema_params" in n for n in names)
  assert any(n.startswith(".params") for n in names) and any(".opt_state" in n for n in names)


def test_ema_decay_warms_up_then_holds():
  got = [float(steps.ema_decay_at(0.999, t)) for t in (0, 1, 90, 10_000)]
  np.testing.assert_allclose(got, [0.1, 2 / 11, 91 / 100, 0.999], rtol=1e-6)
