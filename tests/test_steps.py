"""steps.py: the weight EMA of the train step against a numpy reference; a skipped step
leaves it alone; a run without EMA keeps the train state (and checkpoints) it had. The
flip-averaged evaluation (config.aug.eval_flip) against the model on mirrored images."""
import jax
import jax.numpy as jnp
import numpy as np
import step_kit

from vit_jax import config as config_lib, parallel
from vit_jax.data import augment
from vit_jax.train import state as state_lib, steps

SHAPE = (8, 8, 1)
MEAN_C, STD_C = np.full(1, 127.0, np.float32), np.full(1, 70.0, np.float32)


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


def _eval_step(flip: bool, model, mesh):
  config = config_lib.get_base_config()
  config.image_size, config.aug.eval_flip = SHAPE[0], flip
  return steps.make_eval_step(config, model, mesh, parallel.replicated(mesh),
                              mean_C=MEAN_C, std_C=STD_C)


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror():
  config = config_lib.get_base_config()
  config.model.overrides.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
  model = state_lib.build_model(config, 10)
  # Perturbed: the head starts at zero, and zero logits would hide what is averaged.
  leaves, tree = jax.tree_util.tree_flatten(state_lib.init_params(model, 0, SHAPE))
  rng = np.random.default_rng(1)
  params = tree.unflatten([x + rng.normal(0, 0.1, x.shape).astype(x.dtype) for x in leaves])
  images = np.random.default_rng(0).integers(0, 256, (8, *SHAPE), np.uint8)
  # Mirrored here, on the uint8 images, before preprocessing: left-right is the width axis.
  mirrored = images[:, :, ::-1]
  x, x_mirrored = (augment.eval_preprocess(jnp.asarray(i), config.aug, image_size=SHAPE[0],
                                           mean_C=MEAN_C, std_C=STD_C)
                    for i in (images, mirrored))
  single, single_mirrored = (np.asarray(steps.eval_logits(model, params, v, False))
                             for v in (x, x_mirrored))
  assert np.abs(single - single_mirrored).max() > 1e-3  # The model tells them apart.
  both, both_mirrored = (np.asarray(steps.eval_logits(model, params, v, True))
                         for v in (x, x_mirrored))
  np.testing.assert_allclose(both, (single + single_mirrored) / 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both_mirrored, both, rtol=1e-5, atol=1e-6)

  # The eval step reads config.aug.eval_flip: with it, an image and its mirror score alike.
  mesh = parallel.make_mesh()
  labels = np.arange(8, dtype=np.int32) % 10
  batch, batch_mirrored = ({"image": i, "label": labels, "mask": np.ones(8, bool)}
                           for i in (images, mirrored))
  for flip in (False, True):
    step = _eval_step(flip, model, mesh)
    sums, sums_mirrored = (jax.device_get(step(params, b)) for b in (batch, batch_mirrored))
    want = both if flip else single
    want_loss = -np.take_along_axis(jax.nn.log_softmax(want), labels[:, None], 1).sum()
    np.testing.assert_allclose(sums["loss_sum"], want_loss, rtol=1e-5)
    assert (abs(float(sums["loss_sum"]) - float(sums_mirrored["loss_sum"])) < 1e-4) == flip
