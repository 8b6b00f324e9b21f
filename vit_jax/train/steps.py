"""The jitted train and eval steps, sharded over the mesh.

The batch arrives as uint8 images sharded along the data axis; augmentation, the forward
and backward pass and the optimiser update run in one compiled program. The state is
donated (updated in place) and nothing is fetched to the host here: the loop pulls the
returned scalars only every `log_every_steps`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from vit_jax import models, parallel
from vit_jax.data import augment
from vit_jax.train import metrics, optim
from vit_jax.train.state import TrainState

Batch = dict[str, jax.Array]

# XLA options of the CPU steps (docs/performance.md has the A/B measurements), each used
# only where this jaxlib knows it:
# - a scheduler that orders independent ops to run side by side, so that the thunk
#   executor keeps every core busy;
# - YNNPACK only for fusions around reductions (LayerNorm, softmax) and standalone
#   matmuls in Eigen, which runs the wide (576 to 768 output columns) matmuls of the
#   ViT blocks faster.
_CPU_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
                "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict[str, str]:
  """The XLA options the steps compile with on the current backend."""
  if jax.default_backend() != "cpu":
    return {}
  return {k: v for k, v in _CPU_OPTIONS.items() if accepts(((k, v),))}


@functools.cache
def accepts(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib compiles with `options` (probed on a tiny program): a jaxlib
  that renamed or dropped one runs without it rather than failing."""
  try:
    jax.jit(jnp.negative).lower(jnp.zeros(())).compile(compiler_options=dict(options))
  except Exception:  # XLA names the unknown option or value.  # noqa: BLE001
    return False
  return True


def make_train_step(config: ml_collections.ConfigDict, model: models.VisionTransformer,
                    tx: optax.GradientTransformation, mesh: Mesh, shardings: TrainState, *,
                    num_classes: int, mean_C: np.ndarray, std_C: np.ndarray
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """(state, batch) -> (state, {"loss", "grad_norm", "finite"}) as one jitted program.

  With `config.ema_decay > 0` (the state then has `ema_params`), each applied update also
  moves the EMA towards the new parameters; a skipped (non-finite) step leaves it as it is.
  """
  mean_C, std_C = jnp.asarray(mean_C, jnp.float32), jnp.asarray(std_C, jnp.float32)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    with parallel.traced_over(mesh):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    images_BxSxSxC, targets_BxK = augment.train_preprocess(
        aug_key, batch["image"], batch["label"], config.aug, image_size=config.image_size,
        num_classes=num_classes, label_smoothing=config.label_smoothing,
        mean_C=mean_C, std_C=std_C)

    def loss_fn(params, micro: Batch, micro_index: jax.Array):
      logits_BxK = model.apply(
          {"params": params}, micro["images"], train=True,
          rngs={"dropout": jax.random.fold_in(dropout_key, micro_index)})
      return metrics.cross_entropy(logits_BxK, micro["targets"]).mean(), {}

    (loss, _), grads = optim.accumulate_gradients(
        jax.value_and_grad(loss_fn, has_aux=True), state.params,
        {"images": images_BxSxSxC, "targets": targets_BxK}, config.optim.accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient never reaches the state: the update is dropped, and
    # the loop stops (on_nonfinite="stop") or carries on ("skip").
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_finite = lambda n, o: jnp.where(finite, n, o)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=jax.tree_util.tree_map(keep_finite, params, state.params),
        opt_state=keep_finite_update(finite, opt_state, state.opt_state))
    if config.ema_decay:
      ema = update_ema(state.ema_params, params, ema_decay_at(config.ema_decay, state.step))
      new_state = new_state.replace(
          ema_params=jax.tree_util.tree_map(keep_finite, ema, state.ema_params))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

  return jax.jit(train_step,
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)),
                 donate_argnums=0, compiler_options=compiler_options())


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The EMA decay of the update applied at `step` (0 for the first one):
  min(decay, (1 + step) / (10 + step)), the warm-up of TF's ExponentialMovingAverage with
  num_updates (timm's ModelEma and big_vision alike in spirit): early averages follow the
  weights instead of keeping the random initialisation for thousands of steps."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(ema_params, params, decay: jax.Array):
  """ema + (1 - decay) * (params - ema) per leaf (timm's lerp; exact when they agree)."""
  return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


def keep_finite_update(finite: jax.Array, new_opt_state, old_opt_state):
  """The optimiser state after a step that was finite or not: a skipped step keeps the old
  state (Adam's moments and its bias-correction count included) except the lr schedule's
  counter, which advances so that the schedule follows the global step (as train/lr logs
  it) instead of falling behind by every skipped step."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  return jax.tree_util.tree_map(
      lambda n, o: n if is_schedule(n) else jnp.where(finite, n, o),
      new_opt_state, old_opt_state, is_leaf=is_schedule)


def make_eval_step(config: ml_collections.ConfigDict, model: models.VisionTransformer,
                   mesh: Mesh, param_shardings, *, mean_C: np.ndarray, std_C: np.ndarray
                   ) -> Callable[[object, Batch], dict]:
  """(params, batch with mask) -> masked sums of loss, top-1, top-5 and count."""
  mean_C, std_C = jnp.asarray(mean_C, jnp.float32), jnp.asarray(std_C, jnp.float32)

  def eval_step(params, batch: Batch) -> dict:
    images_BxSxSxC = augment.eval_preprocess(batch["image"], config.aug,
                                             image_size=config.image_size,
                                             mean_C=mean_C, std_C=std_C)
    logits_BxK = eval_logits(model, params, images_BxSxSxC, config.aug.eval_flip)
    return metrics.eval_sums(logits_BxK, batch["label"], batch["mask"])

  return jax.jit(eval_step, in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh),
                 compiler_options=compiler_options())


def eval_logits(model: models.VisionTransformer, params, images_BxSxSxC: jax.Array,
                flip_average: bool, return_intermediates: bool = False):
  """The model's logits of preprocessed images; with `flip_average` (config.aug.eval_flip)
  the mean of the logits of each image and of its mirror image.

  With `return_intermediates`: (logits, extra), the extra outputs (attention maps) of the
  images as given.
  """
  out = model.apply({"params": params}, images_BxSxSxC, train=False,
                    return_intermediates=return_intermediates)
  if not flip_average:
    return out
  # Two passes rather than one over both views concatenated: the batch stays sharded as
  # it came, with no resharding across devices.
  mirrored_BxK = model.apply({"params": params}, images_BxSxSxC[:, :, ::-1], train=False)
  if return_intermediates:
    return (out[0] + mirrored_BxK) / 2, out[1]
  return (out + mirrored_BxK) / 2


def run_eval(eval_step, params, batches) -> dict:
  """Sums over every batch on the device, then one fetch: every example counted once."""
  return metrics.finalize_eval(eval_totals(eval_step, params, batches))


# One program adds a batch's sums to the running totals (one per sum would be four).
_add_sums = jax.jit(functools.partial(jax.tree_util.tree_map, jnp.add))


def eval_totals(eval_step, params, batches) -> dict[str, np.ndarray]:
  """`metrics.eval_sums` added over every batch on the device, fetched once to the host.

  Two programs per batch, and the host stays a few batches ahead of the devices
  (`parallel.DispatchLimit`): an unbounded run-ahead deadlocks XLA's multi-device CPU client.
  """
  limit = parallel.DispatchLimit()
  total = None
  for batch in batches:
    sums = eval_step(params, batch)
    total = sums if total is None else _add_sums(total, sums)
    limit.add(total)
  return jax.device_get(total)
