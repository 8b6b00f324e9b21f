"""The train state, the model a config names, and their sharded initialisation."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vit_jax import models, parallel


@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a run checkpoints: a pytree (jit, shardings and orbax take it as one).

  `ema_params` exists only with `config.ema_decay > 0`: the pytree leaves it out when it
  is None, so a run without EMA saves (and reads) exactly the checkpoints it saved before
  EMA was added, and one with EMA holds it beside the raw weights.
  """
  step: jax.Array  # int32 scalar: updates applied so far.
  params: Any
  opt_state: Any
  # Raw key data (uint32[2]); the step's key is fold_in(key, step), so the random
  # stream depends only on (seed, step) and a resumed run draws the same numbers.
  rng: jax.Array
  # Exponential moving average of `params` (steps.py updates it after every applied step).
  ema_params: Any = None

  def replace(self, **changes) -> TrainState:
    return dataclasses.replace(self, **changes)

  def _fields(self) -> tuple[str, ...]:
    return ("step", "params", "opt_state", "rng") + (
        ("ema_params",) if self.ema_params is not None else ())


jax.tree_util.register_pytree_with_keys(
    TrainState,
    lambda s: ([(jax.tree_util.GetAttrKey(n), getattr(s, n)) for n in s._fields()],
               s._fields()),
    lambda names, children: TrainState(**dict(zip(names, children))),
    lambda s: ([getattr(s, n) for n in s._fields()], s._fields()))


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
  params = parallel.tree_shardings(abstract_state.params, mesh, fsdp)
  return TrainState(
      step=parallel.replicated(mesh), params=params,
      opt_state=parallel.tree_shardings(abstract_state.opt_state, mesh, fsdp),
      rng=parallel.replicated(mesh),
      ema_params=None if abstract_state.ema_params is None else params)


def ema_of(params):
  """A fresh EMA of `params`: a copy (its own buffers, since the state is donated)."""
  return jax.tree_util.tree_map(jnp.copy, params)


def new_state(params, tx: optax.GradientTransformation, rng: jax.Array, *,
              ema: bool) -> TrainState:
  """The state at step 0 (also traced abstractly, to read a checkpoint's structure)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng, ema_params=ema_of(params) if ema else None)


def create_state(model: models.VisionTransformer, tx: optax.GradientTransformation,
                 mesh: Mesh, *, seed: int, image_shape_HWC: tuple[int, ...], fsdp: bool,
                 ema: bool) -> tuple[TrainState, TrainState]:
  """A fresh state, laid out over the mesh as it is created; and its shardings. `ema`
  adds `ema_params`, starting at the initial parameters."""

  def init() -> TrainState:
    params = init_params(model, seed, image_shape_HWC)
    # The data/dropout stream is seeded apart from the parameter init.
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return new_state(params, tx, rng, ema=ema)

  shardings = state_shardings(jax.eval_shape(init), mesh, fsdp)
  return jax.jit(init, out_shardings=shardings)(), shardings
