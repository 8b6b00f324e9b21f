"""A real train step of a tiny ViT on random batches, for tests of the step itself."""
import jax
import numpy as np

from vit_jax import parallel
from vit_jax.train import optim, state as state_lib, steps


def build_step(config, image_shape_HWC: tuple[int, int, int]):
  """(mesh, state, jitted step) for `config` (10 classes) on the current devices."""
  mesh = parallel.make_mesh()
  model = state_lib.build_model(config, 10)
  abstract = jax.eval_shape(lambda: state_lib.init_params(model, 0, image_shape_HWC))
  tx = optim.make_optimizer(config, abstract)
  state, shardings = state_lib.create_state(
      model, tx, mesh, seed=0, image_shape_HWC=image_shape_HWC, fsdp=config.fsdp,
      ema=config.ema_decay > 0)
  channels = image_shape_HWC[-1]
  step = steps.make_train_step(config, model, tx, mesh, shardings, num_classes=10,
                               mean_C=np.full(channels, 127.0, np.float32),
                               std_C=np.full(channels, 70.0, np.float32))
  return mesh, state, step


def random_batch(mesh, seed: int, batch_size: int, image_shape_HWC: tuple[int, int, int]):
  """uint8 images and labels of 10 classes, laid out over the mesh's batch axis."""
  rng = np.random.default_rng(seed)
  sharding = parallel.batch_sharding(mesh)
  images = rng.integers(0, 256, (batch_size, *image_shape_HWC), np.uint8)
  labels = rng.integers(0, 10, (batch_size,)).astype(np.int32)
  return {"image": jax.device_put(images, sharding),
          "label": jax.device_put(labels, sharding)}
