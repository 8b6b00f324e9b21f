"""Schedule values, weight-decay semantics, clipping, fine-tuning multipliers, accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import models
from vit_jax.config import get_base_config
from vit_jax.train import optim

D, H, HD, MLP, K = 4, 2, 2, 8, 3


def _block() -> dict:
  attn = {name: {"kernel": np.ones((D, H, HD), np.float32), "bias": np.ones((H, HD), np.float32)}
          for name in ("query", "key", "value")}
  attn["out"] = {"kernel": np.ones((H, HD, D), np.float32), "bias": np.ones((D,), np.float32)}
  norm = {"scale": np.ones((D,), np.float32), "bias": np.ones((D,), np.float32)}
  return {
      "LayerNorm_0": norm,
      "MultiHeadDotProductAttention_1": attn,
      "LayerNorm_2": dict(norm),
      "MlpBlock_3": {"Dense_0": {"kernel": np.ones((D, MLP), np.float32),
                                 "bias": np.ones((MLP,), np.float32)},
                     "Dense_1": {"kernel": np.ones((MLP, D), np.float32),
                                 "bias": np.ones((D,), np.float32)}},
  }


def vit_params(depth: int = 2, scan: bool = False) -> dict:
  """A ViT parameter tree with the published checkpoints' names, all ones."""
  transformer = {
      "posembed_input": {"pos_embedding": np.ones((1, 5, D), np.float32)},
      "encoder_norm": {"scale": np.ones((D,), np.float32), "bias": np.ones((D,), np.float32)},
  }
  if scan:
    transformer["encoderblock"] = jax.tree_util.tree_map(
        lambda *xs: np.stack(xs), *[_block() for _ in range(depth)])
  else:
    transformer.update({f"encoderblock_{i}": _block() for i in range(depth)})
  return {
      "embedding": {"kernel": np.ones((2, 2, 3, D), np.float32), "bias": np.ones((D,), np.float32)},
      "cls": np.ones((1, 1, D), np.float32),
      "Transformer": transformer,
      "head_hidden_0": {"kernel": np.ones((D, D), np.float32), "bias": np.ones((D,), np.float32)},
      "pre_logits": {"kernel": np.ones((D, D), np.float32), "bias": np.ones((D,), np.float32)},
      "head": {"kernel": np.ones((D, K), np.float32), "bias": np.ones((K,), np.float32)},
  }


def make_config(**optim_overrides):
  config = get_base_config()
  config.total_steps = 110
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  config.optim.weight_decay = 0.0
  for key, value in optim_overrides.items():
    config.optim[key] = value
  return config


def one_update(config, params, grads):
  tx = optim.make_optimizer(config, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --- Schedule ------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, expected", [
    # step:      0     5      10     60      110    200 (past the end: held)
    ("cosine", [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0]),
    ("linear", [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0]),
    ("constant", [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3]),
])
def test_schedule_values(schedule, expected):
  config = make_config(lr=1e-3, warmup_steps=10, schedule=schedule)
  lr = optim.make_schedule(config)
  np.testing.assert_allclose([lr(s) for s in (0, 5, 10, 60, 110, 200)], expected, atol=1e-9)


def test_schedule_shape_between_points_and_end_fraction():
  config = make_config(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_fraction=0.1)
  lr = optim.make_schedule(config)
  # Cosine at a quarter of the decay: end + (peak - end) * (1 + cos(pi/4)) / 2.
  np.testing.assert_allclose(lr(35), 0.1 + 0.9 * (1 + np.cos(np.pi / 4)) / 2, rtol=1e-6)
  np.testing.assert_allclose(lr(110), 0.1, rtol=1e-6)
  config.optim.schedule = "linear"
  np.testing.assert_allclose(optim.make_schedule(config)(35), 1.0 - 0.9 * 0.25, rtol=1e-6)


def test_schedule_without_warmup_starts_at_peak():
  config = make_config(lr=2e-3, schedule="cosine")
  np.testing.assert_allclose(optim.make_schedule(config)(0), 2e-3, rtol=1e-7)


def test_schedule_rejects_unresolved_total_steps():
  config = make_config()
  config.total_steps = 0
  with pytest.raises(ValueError, match="config.total_steps"):
    optim.make_schedule(config)
  config.total_steps = 10
  config.optim.warmup_steps = -1
  with pytest.raises(ValueError, match="config.optim.warmup_steps"):
    optim.make_schedule(config)


@pytest.mark.parametrize("batch_size,warmup_steps,total_steps", [
    (256, 1953, 19531), (1024, 488, 4883), (128, 3906, 39062)])
def test_cifar100_warmup_is_ten_epochs_at_any_batch_size(batch_size, warmup_steps,
                                                         total_steps):
  from vit_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import cifar100  # pylint: disable=g-import-not-at-top
  config = cifar100.get_config()
  config.batch_size = batch_size  # As --config.batch_size=N does, after get_config.
  config_lib.resolve_steps(config, 50_000)
  assert (config.optim.warmup_steps, config.total_steps) == (warmup_steps, total_steps)
  # An explicit step count is kept.
  config = cifar100.get_config()
  config.total_steps, config.optim.warmup_epochs, config.optim.warmup_steps = 500, 0.0, 50
  config_lib.resolve_steps(config, 50_000)
  assert (config.optim.warmup_steps, config.total_steps) == (50, 500)


def test_a_skipped_step_keeps_the_moments_and_advances_the_schedule():
  from vit_jax.train import steps  # pylint: disable=g-import-not-at-top
  config = make_config(lr=1.0, warmup_steps=4, schedule="linear")
  config.total_steps = 8
  params = {"w": jnp.ones((3,))}
  tx = optim.make_optimizer(config, params)
  opt_state = tx.init(params)
  for step in range(3):  # Finite, finite, skipped.
    _, new = tx.update({"w": jnp.full((3,), 0.5)}, opt_state, params)
    opt_state = steps.keep_finite_update(jnp.asarray(step < 2), new, opt_state)
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  schedules = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule)
               if is_schedule(x)]
  assert [int(s.count) for s in schedules] == [3]  # The lr schedule at the global step.
  # Everything else, Adam's moments and bias-correction count included, as after the two
  # finite steps.
  _, twice = tx.update({"w": jnp.full((3,), 0.5)}, tx.init(params), params)
  _, twice = tx.update({"w": jnp.full((3,), 0.5)}, twice, params)
  rest = lambda state: [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_schedule)  # noqa: E731
                        if not is_schedule(x)]
  for got, want in zip(rest(opt_state), rest(twice), strict=True):
    np.testing.assert_array_equal(got, want)
  assert any(x.dtype == jnp.int32 and int(x) == 2 for x in rest(opt_state))  # Adam's count.


def test_run_shorter_than_warmup_is_all_warmup():
  config = make_config(lr=1.0, warmup_steps=20, schedule="cosine")
  config.total_steps = 10
  schedule = optim.make_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(9)], [0.0, 0.25, 0.45],
                             rtol=1e-6)


# --- Weight decay --------------------------------------------------------------------


def test_weight_decay_mask_selects_exactly_the_kernels():
  mask = flat(optim.weight_decay_mask(vit_params(depth=1)))
  decayed = sorted(name for name, on in mask.items() if on)
  assert decayed == sorted([
      "embedding/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel",
      "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel",
      "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel",
      "head_hidden_0/kernel",
      "pre_logits/kernel",
      "head/kernel",
  ])
  assert len(mask) == 28  # Everything else (biases, norms, cls, pos_embedding) is False.


@pytest.mark.parametrize("mode, expected_factor", [
    ("decoupled_lr", 1 - 0.1 * 0.5),  # w1 = w0 - lr * wd * w0
    ("decoupled", 1 - 0.5),  # w1 = w0 - wd * w0
])
def test_adamw_decay_modes_with_zero_gradient(mode, expected_factor):
  config = make_config(name="adamw", lr=0.1, weight_decay=0.5, weight_decay_mode=mode)
  params = vit_params(depth=1)
  params["head"]["kernel"] = np.full((D, K), 3.0, np.float32)
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  new = flat(optax.apply_updates(params, one_update(config, params, zeros)))
  np.testing.assert_allclose(new["head/kernel"], 3.0 * expected_factor, rtol=1e-6)
  np.testing.assert_allclose(new["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"],
                             expected_factor, rtol=1e-6)
  for name in ("head/bias", "cls", "Transformer/encoder_norm/scale",
               "Transformer/posembed_input/pos_embedding"):
    np.testing.assert_array_equal(new[name], 1.0)


@pytest.mark.parametrize("mode", ["decoupled_lr", "decoupled"])
def test_adamw_two_steps_match_hand_computation(mode):
  lr, wd, b1, b2, eps = 0.1, 0.2, 0.9, 0.999, 1e-8
  config = make_config(name="adamw", lr=lr, weight_decay=wd, weight_decay_mode=mode,
                       b1=b1, b2=b2, eps=eps, decay_kernels_only=False)
  params = {"head": {"bias": np.array([2.0], np.float32)}}
  tx = optim.make_optimizer(config, params)
  state = tx.init(params)
  w, m, v = 2.0, 0.0, 0.0
  for t, g in enumerate([0.5, -1.5], start=1):
    grads = {"head": {"bias": np.array([g], np.float32)}}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    direction = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    decay = lr * wd * w if mode == "decoupled_lr" else wd * w
    w = w - lr * direction - decay
    np.testing.assert_allclose(params["head"]["bias"], [w], rtol=1e-6)


@pytest.mark.parametrize("name,mode", [("adamw", "decoupled_lr"), ("adamw", "decoupled"),
                                       ("sgd", "decoupled_lr")])
def test_mu_dtype_sets_the_first_moment_only(name, mode):
  params = vit_params(depth=1)
  grads = jax.tree_util.tree_map(lambda p: np.full_like(p, 0.3), params)
  states = {}
  for mu_dtype in ("float32", "bfloat16"):
    config = make_config(name=name, weight_decay_mode=mode, mu_dtype=mu_dtype)
    tx = optim.make_optimizer(config, params)
    states[mu_dtype] = tx.update(grads, tx.init(params), params)
  dtypes = lambda tree: {np.dtype(x.dtype).name  # noqa: E731
                         for x in jax.tree_util.tree_leaves(tree) if np.ndim(x)}
  (_, state32), (updates16, state16) = states["float32"], states["bfloat16"]
  assert dtypes(state32) == {"float32"}
  moments16 = [s for s in jax.tree_util.tree_leaves(
      state16, is_leaf=lambda x: isinstance(x, (optax.ScaleByAdamState, optax.TraceState)))
      if isinstance(s, (optax.ScaleByAdamState, optax.TraceState))]
  (moments,) = moments16
  first = moments.mu if name == "adamw" else moments.trace
  assert dtypes(first) == {"bfloat16"}
  if name == "adamw":
    assert dtypes(moments.nu) == {"float32"}  # The second moment stays float32.
  assert dtypes(updates16) == {"float32"}  # And so do the parameters' updates.


def test_decay_kernels_only_false_decays_everything():
  config = make_config(name="adamw", lr=0.1, weight_decay=0.5, decay_kernels_only=False)
  params = vit_params(depth=1)
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  for name, value in flat(optax.apply_updates(params, one_update(config, params, zeros))).items():
    np.testing.assert_allclose(value, 0.95, rtol=1e-6, err_msg=name)


def test_sgd_weight_decay_is_l2_added_to_the_gradient_before_momentum():
  config = make_config(name="sgd", lr=0.1, weight_decay=0.5, momentum=0.9)
  params = {"head": {"kernel": np.array([[2.0]], np.float32),
                     "bias": np.array([2.0], np.float32)}}
  grads = {"head": {"kernel": np.array([[1.0]], np.float32),
                    "bias": np.array([1.0], np.float32)}}
  tx = optim.make_optimizer(config, params)
  state = tx.init(params)
  buf, w = 0.0, 2.0
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    buf = 0.9 * buf + (1.0 + 0.5 * w)
    w = w - 0.1 * buf
  np.testing.assert_allclose(params["head"]["kernel"], [[w]], rtol=1e-6)
  # The bias is not decayed: plain momentum on g = 1: 2 - 0.1 * (1 + 1.9).
  np.testing.assert_allclose(params["head"]["bias"], [2.0 - 0.1 * 2.9], rtol=1e-6)


def test_unknown_names_are_rejected():
  params = {"head": {"bias": np.zeros((1,), np.float32)}}
  for key, value in [("name", "lamb"), ("weight_decay_mode", "l2")]:
    with pytest.raises(ValueError, match=f"config.optim.{key}"):
      optim.make_optimizer(make_config(**{key: value}), params)


# --- Clipping ------------------------------------------------------------------------


def test_clipping_by_global_norm():
  config = make_config(name="sgd", lr=1.0, momentum=0.0, grad_clip_norm=1.0)
  params = {"head": {"kernel": np.zeros((2, 1), np.float32), "bias": np.zeros((1,), np.float32)}}
  grads = {"head": {"kernel": np.array([[6.0], [0.0]], np.float32),
                    "bias": np.array([8.0], np.float32)}}  # Global norm 10.
  updates = flat(one_update(config, params, grads))
  np.testing.assert_allclose(updates["head/kernel"], [[-0.6], [0.0]], rtol=1e-6)
  np.testing.assert_allclose(updates["head/bias"], [-0.8], rtol=1e-6)
  # Below the threshold the gradient passes through unchanged.
  small = jax.tree_util.tree_map(lambda g: g / 20, grads)
  np.testing.assert_allclose(flat(one_update(config, params, small))["head/bias"], [-0.4],
                             rtol=1e-6)


# --- Fine-tuning ---------------------------------------------------------------------


def test_freeze_backbone_updates_only_the_head_and_keeps_no_backbone_state():
  config = make_config(name="adamw", lr=0.1, weight_decay=0.5, grad_clip_norm=1.0)
  config.freeze_backbone = True
  params = vit_params(depth=2)
  grads = jax.tree_util.tree_map(np.ones_like, params)
  tx = optim.make_optimizer(config, params)
  state = tx.init(params)
  updates = flat(tx.update(grads, state, params)[0])
  head = {n for n in updates if n.split("/")[0] in ("head", "pre_logits", "head_hidden_0")}
  assert len(head) == 6
  for name, update in updates.items():
    assert np.all(update != 0) if name in head else np.all(update == 0), name
  # Adam moments exist for the 6 head leaves only (mu and nu), plus the step counts.
  head_size = sum(params[n][p].size for n in ("head", "pre_logits", "head_hidden_0")
                  for p in ("kernel", "bias"))
  state_size = sum(np.size(x) for x in jax.tree_util.tree_leaves(state))
  assert head_size * 2 <= state_size <= head_size * 2 + 4


def test_freeze_backbone_requires_a_head():
  config = make_config()
  config.freeze_backbone = True
  params = {"params": vit_params(depth=1)}
  with pytest.raises(ValueError, match="freeze_backbone"):
    optim.make_optimizer(config, params).init(params)


def test_backbone_lr_mult_scales_backbone_updates():
  config = make_config(name="sgd", lr=1.0, momentum=0.0)
  config.backbone_lr_mult = 0.5
  params = vit_params(depth=2)
  grads = jax.tree_util.tree_map(np.ones_like, params)
  for name, update in flat(one_update(config, params, grads)).items():
    expected = -1.0 if name.split("/")[0] in ("head", "pre_logits", "head_hidden_0") else -0.5
    np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=name)


LAYER_SCALES = {  # layer_decay 0.5, two blocks: scale = 0.5 ** (3 - layer_id).
    "stem": 0.125, "embedding": 0.125, "cls": 0.125, "Transformer/posembed_input": 0.125,
    "Transformer/encoderblock_0": 0.25, "Transformer/encoderblock_1": 0.5,
    "Transformer/encoder_norm": 1.0, "head_hidden_0": 1.0, "pre_logits": 1.0, "head": 1.0,
}


def _expected_scale(name: str) -> float:
  return next(s for prefix, s in LAYER_SCALES.items() if name.startswith(prefix + "/")
              or name == prefix)


@pytest.mark.parametrize("backbone_lr_mult", [1.0, 0.1])
def test_layer_decay_multipliers(backbone_lr_mult):
  config = make_config(name="sgd", lr=1.0, momentum=0.0)
  config.layer_decay = 0.5
  config.backbone_lr_mult = backbone_lr_mult
  params = vit_params(depth=2)
  params["stem"] = {"kernel": np.ones((3, 3, 3, 4), np.float32),  # stem_features=4.
                    "bias": np.ones((4,), np.float32)}
  grads = jax.tree_util.tree_map(np.ones_like, params)
  updates = flat(one_update(config, params, grads))
  assert len(updates) == 46
  for name, update in updates.items():
    head = name.split("/")[0] in ("head", "pre_logits", "head_hidden_0")
    backbone = 1.0 if head else backbone_lr_mult
    np.testing.assert_allclose(update, -_expected_scale(name) * backbone, rtol=1e-6,
                               err_msg=name)


def test_layer_decay_with_scanned_blocks_scales_each_depth_slice():
  config = make_config(name="sgd", lr=1.0, momentum=0.0)
  config.layer_decay = 0.5
  params = vit_params(depth=2, scan=True)
  grads = jax.tree_util.tree_map(np.ones_like, params)
  updates = flat(one_update(config, params, grads))
  for name, update in updates.items():
    if name.startswith("Transformer/encoderblock/"):
      np.testing.assert_allclose(update[0], -0.25, err_msg=name)
      np.testing.assert_allclose(update[1], -0.5, err_msg=name)
    else:
      np.testing.assert_allclose(update, -_expected_scale(name), err_msg=name)


def test_layer_decay_covers_every_parameter_of_the_model_options():
  """Registers with the embeddings, the MAP head with the top: every model's tree works."""
  config = make_config(name="sgd", lr=1.0, momentum=0.0)
  config.layer_decay = 0.5
  model = models.create_model("ViT-Ti/4", num_classes=3, width=8, depth=2, num_heads=2,
                              mlp_dim=8, num_registers=2, pool="map", class_token=False,
                              stem_features=4, representation_size=8)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                             train=False))["params"]
  params = jax.tree_util.tree_map(lambda x: np.ones(x.shape, x.dtype), params)
  updates = flat(one_update(config, params, params))
  scales = {**LAYER_SCALES, "registers": 0.125, "MAPHead_0": 1.0}
  assert {name.split("/")[0] for name in updates} >= {"registers", "MAPHead_0", "stem"}
  for name, update in updates.items():
    expected = next(s for prefix, s in scales.items() if name == prefix
                    or name.startswith(prefix + "/"))
    np.testing.assert_allclose(update, -expected, rtol=1e-6, err_msg=name)


def test_layer_decay_rejects_unknown_parameter_names():
  config = make_config()
  config.layer_decay = 0.5
  params = {"head": {"bias": np.zeros((1,), np.float32)},
            "dist_token": np.zeros((1, 1, D), np.float32)}
  with pytest.raises(ValueError, match="dist_token"):
    one_update(config, params, params)


# --- Gradient accumulation -----------------------------------------------------------


def _linear_loss_and_grad(params, batch, micro_index):
  def loss_fn(p):
    pred = batch["x"] @ p["w"] + p["b"]
    err = (pred - batch["y"]) ** 2
    return jnp.mean(err), {"mse": jnp.mean(err), "max_pred": jnp.max(pred)}

  del micro_index
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def test_accumulated_gradients_equal_the_full_batch():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.ones((2,), np.float32)}
  batch = {"x": rng.normal(size=(16, 3)).astype(np.float32),
           "y": rng.normal(size=(16, 2)).astype(np.float32)}
  fn = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  (loss1, aux1), grads1 = fn(_linear_loss_and_grad, params, batch, 1)
  (loss4, aux4), grads4 = fn(_linear_loss_and_grad, params, batch, 4)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
  np.testing.assert_allclose(aux4["mse"], aux1["mse"], rtol=1e-6)
  for g4, g1 in zip(jax.tree_util.tree_leaves(grads4), jax.tree_util.tree_leaves(grads1)):
    np.testing.assert_allclose(g4, g1, rtol=1e-6, atol=1e-6)
  # The reference is the analytic full-batch gradient: d/db mean((xw + b - y)^2) over
  # 16 rows x 2 outputs = mean over rows of (pred - y).
  pred = batch["x"] @ params["w"] + params["b"]
  np.testing.assert_allclose(grads1["b"], (pred - batch["y"]).mean(0), rtol=1e-5)


def test_accumulation_passes_each_micro_index_and_strided_rows():
  def fn(params, batch, micro_index):
    del params
    index = micro_index.astype(jnp.float32)
    return (jnp.sum(batch) * (index + 1), {"index": index}), {}

  batch = jnp.arange(8.0)
  (loss, aux), _ = optim.accumulate_gradients(fn, {}, batch, 4)
  # Micro-batch j holds rows j and j + 4 (sums 4, 6, 8, 10), weighted by j + 1 and
  # averaged; contiguous micro-batches (sums 1, 5, 9, 13) would give 22.5.
  np.testing.assert_allclose(loss, (4 * 1 + 6 * 2 + 8 * 3 + 10 * 4) / 4)
  np.testing.assert_allclose(aux["index"], 1.5)  # mean of 0, 1, 2, 3
  with pytest.raises(ValueError, match="accum_steps=3"):
    optim.accumulate_gradients(fn, {}, batch, 3)
