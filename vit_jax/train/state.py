"""The train state, the model a config names, and their sharded initialisation."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vit_jax import models, parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far.
  params: Any
  opt_state: Any
  # Raw key data (uint32[2]); the step's key is fold_in(key, step), so the random
  # stream depends only on (seed, step) and a resumed run draws the same numbers.
  rng: jax.Array


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.VisionTransformer:
  """The model `config` names, with its overrides and the run-wide model settings."""
  return models.create_model(
      config.model.name, num_classes=num_classes, dtype=config.compute_dtype,
      scan_layers=config.scan_layers, remat=config.remat, kernels=config.kernels,
      **{k: v for k, v in config.model.overrides.to_dict().items() if v is not None})


def init_params(model: models.VisionTransformer, seed: int, image_shape_HWC: tuple[int, ...]):
  x_1xHxWxC = jnp.zeros((1, *image_shape_HWC), jnp.float32)
  return model.init(jax.random.key(seed), x_1xHxWxC, train=False)["params"]


def state_shardings(abstract_state: TrainState, mesh: Mesh, fsdp: bool) -> TrainState:
  return TrainState(
      step=parallel.replicated(mesh),
      params=parallel.tree_shardings(abstract_state.params, mesh, fsdp),
      opt_state=parallel.tree_shardings(abstract_state.opt_state, mesh, fsdp),
      rng=parallel.replicated(mesh))


def create_state(model: models.VisionTransformer, tx: optax.GradientTransformation,
                 mesh: Mesh, *, seed: int, image_shape_HWC: tuple[int, ...],
                 fsdp: bool) -> tuple[TrainState, TrainState]:
  """A fresh state, laid out over the mesh as it is created; and its shardings."""

  def init() -> TrainState:
    params = init_params(model, seed, image_shape_HWC)
    # The data/dropout stream is seeded apart from the parameter init.
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng)

  shardings = state_shardings(jax.eval_shape(init), mesh, fsdp)
  return jax.jit(init, out_shardings=shardings)(), shardings
