"""Tests of vit_jax/augment.py: exact values where the op has them, statistics otherwise."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import config as config_lib, parallel
from vit_jax.data import augment, geometry, randaugment

NUM_CLASSES = 10


def make_aug(**overrides) -> ml_collections.ConfigDict:
  """The base config's aug block (every random op off) with `overrides` applied."""
  aug = config_lib.get_base_config().aug
  for key, value in overrides.items():
    setattr(aug, key, value)
  return aug


def random_images(batch: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, channels), np.uint8)


def train(images, aug, *, key=0, image_size=None, labels=None, label_smoothing=0.0,
          mean_C=None, std_C=None):
  """train_preprocess on a uint8 batch; labels default to 0..B-1 mod K."""
  labels = np.arange(len(images)) % NUM_CLASSES if labels is None else labels
  step = _jitted(augment.train_preprocess, _frozen(aug), image_size or images.shape[1],
                 num_classes=NUM_CLASSES, label_smoothing=label_smoothing)
  return step(jax.random.key(key), jnp.asarray(images), jnp.asarray(labels, jnp.int32),
              mean_C=mean_C, std_C=std_C)


def evaluate(images, aug, *, image_size=None, mean_C=None, std_C=None):
  step = _jitted(augment.eval_preprocess, _frozen(aug), image_size or images.shape[1])
  return step(jnp.asarray(images), mean_C=mean_C, std_C=std_C)


def _frozen(aug: ml_collections.ConfigDict) -> tuple:
  return tuple(sorted((key, tuple(value) if isinstance(value, (list, tuple)) else value)
                      for key, value in aug.items()))


@functools.cache
def _jitted(preprocess, frozen_aug: tuple, image_size: int, **static):
  """One compiled program per (function, config, size): far fewer compiles than running the
  ops eagerly, which compiles each primitive on each new shape."""
  aug = make_aug(**dict(frozen_aug))
  return jax.jit(functools.partial(preprocess, aug=aug, image_size=image_size, **static))


# Whole programs compile once per shape, far faster than running the ops eagerly.
warp = jax.jit(geometry.warp_affine, static_argnames=("out_hw", "fill"))
rand_augment_color = jax.jit(randaugment.color_ops, static_argnames="level")

# Every random op at once (pad_crop and inception exclude each other).
ALL_OPS = dict(crop="pad_crop", flip=True, rotate=0.05, zoom=0.2, randaugment_layers=2,
               mixup_alpha=0.8, cutmix_alpha=1.0, random_erasing=0.5,
               normalize="minus_one_one")
KERAS_ORIGIN = dict(normalize="dataset", flip=True, rotate=0.02, zoom=0.2)


# --- Determinism ----------------------------------------------------------------------------


def test_same_key_bit_identical_other_key_differs():
  images = random_images(8, 32, 3)
  (x1, t1), (x2, t2), (x3, t3) = (
      train(images, make_aug(**ALL_OPS), key=key, image_size=24, label_smoothing=0.1)
      for key in (7, 7, 8))
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(t1, t2)
  assert not np.array_equal(x1, x3) and not np.array_equal(t1, t3)


def test_batch_sharding_draws_the_same_randomness():
  """8 devices draw what 1 draws (jax.random's threefry is partitionable, the gathers are
  per image), so a resumed run may use another device count. Values match to float
  rounding: XLA fuses the partitioned program differently."""
  assert jax.device_count() == 8
  mesh = parallel.make_mesh()
  batch_sharded, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  images, labels = random_images(16, 32, 3), np.arange(16, dtype=np.int32) % NUM_CLASSES
  aug = make_aug(crop="inception", flip=True, random_erasing=0.5, normalize="minus_one_one")
  preprocess = functools.partial(augment.train_preprocess, aug=aug, image_size=40,
                                 num_classes=NUM_CLASSES, label_smoothing=0.0,
                                 mean_C=None, std_C=None)
  sharded = jax.jit(preprocess, in_shardings=(replicated, batch_sharded, batch_sharded),
                    out_shardings=(batch_sharded, batch_sharded))
  x_sharded, t_sharded = sharded(jax.random.key(3), jax.device_put(images, batch_sharded),
                                 jax.device_put(labels, batch_sharded))
  assert x_sharded.sharding.spec == P(parallel.DATA_AXIS)
  x_single, t_single = jax.jit(preprocess)(jax.random.key(3), images, labels)
  np.testing.assert_allclose(x_sharded, x_single, atol=1e-5)
  np.testing.assert_allclose(t_sharded, t_single, atol=1e-6)


# --- Shapes and ranges --------------------------------------------------------------------


# Mixing and erasing have tests of their own, on the shapes they need.
@pytest.mark.parametrize("overrides,size,channels,image_size", [
    ({}, 28, 1, 32), (dict(crop="pad_crop"), 28, 1, 32),
    (dict(crop="inception"), 32, 3, 24), (dict(flip=True), 32, 3, 24),
    (dict(rotate=0.1, zoom=0.3), 28, 1, 32), (dict(randaugment_layers=2), 28, 1, 32),
    (ALL_OPS, 32, 3, 24)],
    ids=["none", "pad_crop", "inception", "flip", "rotate_zoom", "randaugment", "all"])
def test_shapes_dtypes_and_targets(overrides, size, channels, image_size):
  images = random_images(8, size, channels)
  x, targets = train(images, make_aug(**{**overrides, "normalize": "minus_one_one"}),
                     image_size=image_size, label_smoothing=0.1)
  assert x.shape == (8, image_size, image_size, channels) and x.dtype == jnp.float32
  assert targets.shape == (8, NUM_CLASSES) and targets.dtype == jnp.float32
  assert np.isfinite(x).all()
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  if not overrides.get("random_erasing"):  # erasing noise may leave [-1, 1]
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_label_smoothing_values():
  _, targets = train(random_images(4, 8, 3), make_aug(normalize="minus_one_one"),
                     labels=[3, 0, 9, 3], label_smoothing=0.1)
  expected = np.full((4, NUM_CLASSES), 0.01, np.float32)
  expected[[0, 1, 2, 3], [3, 0, 9, 3]] = 0.91
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


# --- Normalisation and resize ----------------------------------------------------------------


def test_dataset_normalization_standardises_each_channel():
  images = random_images(64, 16, 3)
  images[..., 1] //= 4  # channels with different statistics
  images[..., 2] = images[..., 2] // 2 + 100
  pixels_NxC = images.reshape(-1, 3).astype(np.float64)
  x = evaluate(images, make_aug(normalize="dataset"), mean_C=jnp.asarray(pixels_NxC.mean(0)),
               std_C=jnp.asarray(pixels_NxC.std(0)))
  x_NxC = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(x_NxC.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(x_NxC.std(0), 1.0, atol=1e-4)


def test_minus_one_one_and_imagenet_values():
  images = np.zeros((1, 2, 2, 3), np.uint8)
  images[0, 0, 0] = 255
  x = evaluate(images, make_aug(normalize="minus_one_one"))
  np.testing.assert_array_equal(x[0, 0, 0], [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(x[0, 1, 1], [-1.0, -1.0, -1.0])
  x = evaluate(images, make_aug(normalize="imagenet"))
  np.testing.assert_allclose(x[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406]))
                             / np.array([0.229, 0.224, 0.225]), rtol=1e-5)


def test_bad_settings_raise():
  images = random_images(2, 8, 1)
  with pytest.raises(ValueError, match="mean_C"):
    evaluate(images, make_aug(normalize="dataset"))
  with pytest.raises(ValueError, match="RGB"):
    evaluate(images, make_aug(normalize="imagenet"))
  with pytest.raises(ValueError, match="crop"):
    train(images, make_aug(crop="random", normalize="minus_one_one"))


@pytest.mark.parametrize("size,channels,image_size", [(28, 1, 32), (32, 3, 32), (32, 3, 72)])
def test_train_without_random_ops_equals_eval(size, channels, image_size):
  images = random_images(8, size, channels)
  mean_C, std_C = jnp.full((channels,), 110.0), jnp.full((channels,), 70.0)
  aug = make_aug(normalize="dataset")
  x, _ = train(images, aug, image_size=image_size, mean_C=mean_C, std_C=std_C)
  np.testing.assert_array_equal(
      x, evaluate(images, aug, image_size=image_size, mean_C=mean_C, std_C=std_C))


def test_eval_crop_fraction_keeps_the_centre_and_1_keeps_everything():
  images = random_images(2, 32, 3)
  x = evaluate(images, make_aug(eval_crop_fraction=0.875, normalize="minus_one_one"),
               image_size=28)
  centre = images[:, 2:30, 2:30].astype(np.float32) / 127.5 - 1  # 28 = 0.875 * 32
  np.testing.assert_allclose(x, centre, atol=1e-5)
  whole = evaluate(images, make_aug(crop="inception", normalize="minus_one_one"))
  np.testing.assert_allclose(whole, images.astype(np.float32) / 127.5 - 1, atol=1e-5)


# --- Geometry ------------------------------------------------------------------------------


def test_flip_mirrors_about_half_the_images():
  images = random_images(512, 8, 3)
  aug = make_aug(flip=True, normalize="minus_one_one")
  x, _ = train(images, aug)
  plain = np.asarray(evaluate(images, aug))
  same = (np.asarray(x) == plain).all(axis=(1, 2, 3))
  mirrored = (np.asarray(x) == plain[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (same ^ mirrored).all()  # random images are never symmetric
  assert 0.4 < mirrored.mean() < 0.6


def test_warp_identity_is_exact():
  images = jnp.asarray(random_images(3, 9, 3), jnp.float32)
  matrix = geometry.rotation_zoom_matrix(jnp.zeros(3), jnp.ones(3), jnp.ones(3), 9, 9)
  np.testing.assert_array_equal(warp(images, matrix, (9, 9), fill="reflect"),
                                images)


def test_quarter_turn_is_rot90_counter_clockwise():
  images = jnp.asarray(random_images(2, 7, 3), jnp.float32)
  matrix = geometry.rotation_zoom_matrix(jnp.full(2, math.pi / 2), jnp.ones(2), jnp.ones(2), 7, 7)
  rotated = warp(images, matrix, (7, 7), fill="reflect")
  np.testing.assert_allclose(rotated, np.rot90(images, k=1, axes=(1, 2)), atol=1e-3)


def test_zoom_out_reflects_and_zoom_in_interpolates():
  row = jnp.array([10.0, 20.0, 40.0, 80.0, 160.0])
  images = jnp.broadcast_to(row[None, None, :, None], (1, 3, 5, 1))
  ones = jnp.ones(1)
  # Zoom x2 about column 2 reads columns 2x - 2 = -2, 0, 2, 4, 6; -2 and 6 reflect to 1, 3.
  zoomed_out = warp(
      images, geometry.rotation_zoom_matrix(jnp.zeros(1), ones, 2 * ones, 3, 5), (3, 5),
      fill="reflect")
  np.testing.assert_allclose(zoomed_out[0, 1, :, 0], [20, 10, 40, 160, 80])
  # Zoom x0.5 reads columns 0.5x + 1 = 1, 1.5, 2, 2.5, 3.
  zoomed_in = warp(
      images, geometry.rotation_zoom_matrix(jnp.zeros(1), ones, ones / 2, 3, 5), (3, 5),
      fill="reflect")
  np.testing.assert_allclose(zoomed_in[0, 1, :, 0], [20, 30, 40, 60, 80])


def test_warp_constant_fill_and_blend():
  images = jnp.asarray(random_images(1, 6, 2), jnp.float32)
  shift_right = jnp.array([[[1.0, 0.0, -2.0], [0.0, 1.0, 0.0]]])  # reads column x - 2
  out = warp(images, shift_right, (6, 6), fill=7.0)
  np.testing.assert_array_equal(out[:, :, :2], 7.0)
  np.testing.assert_array_equal(out[:, :, 2:], images[:, :, :4])
  half = jnp.array([[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]])  # column 0 is half fill
  out = warp(images, half, (6, 6), fill=7.0)
  np.testing.assert_allclose(out[:, :, 0], (images[:, :, 0] + 7.0) / 2, rtol=1e-6)


def test_random_rotate_zoom_stays_close_to_the_input():
  """Keras's 0.02 turn and 20% zoom move pixels only a little: a smooth image changes little
  and its mean is about kept (reflect fill brings in no new values)."""
  ramp = np.add.outer(np.arange(32), np.arange(32)) * 4
  images = np.broadcast_to(ramp[None, :, :, None], (16, 32, 32, 1)).astype(np.uint8)
  aug = make_aug(rotate=0.02, zoom=0.2, normalize="minus_one_one")
  x, _ = train(images, aug)
  plain = evaluate(images, aug)
  assert not np.array_equal(x, plain)
  np.testing.assert_allclose(np.asarray(x).mean((1, 2, 3)), np.asarray(plain).mean((1, 2, 3)),
                             atol=0.1)


def test_pad_crop_is_a_window_of_the_zero_padded_image():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  images = np.broadcast_to(image, (32, 16, 16, 1))
  x, _ = train(images, make_aug(crop="pad_crop", crop_padding=4, normalize="minus_one_one"))
  pixels = np.rint((np.asarray(x) + 1) * 127.5)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0))).astype(np.float64)
  offsets = set()
  for crop in pixels:
    matches = [(dy, dx) for dy in range(9) for dx in range(9)
               if np.array_equal(crop, padded[dy:dy + 16, dx:dx + 16])]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) > 10


def test_inception_crop_of_the_whole_image_is_a_resize():
  """Scale (1, 1) never fits an aspect ratio other than 1, so every image falls back to the
  whole image: the box mapping must then match jax.image.resize (upsampling)."""
  images = random_images(4, 16, 3)
  aug = make_aug(crop="inception", crop_scale=(1.0, 1.0), normalize="minus_one_one")
  x, _ = train(images, aug, image_size=24)
  resized = jax.image.resize(jnp.asarray(images, jnp.float32), (4, 24, 24, 3), "bilinear")
  np.testing.assert_allclose(x, resized / 127.5 - 1, atol=1e-5)


def test_inception_crop_zooms_in():
  """Small boxes upsample a part of the image: neighbouring output pixels get closer."""
  images = random_images(8, 32, 1)
  aug = make_aug(crop="inception", crop_scale=(0.1, 0.1), normalize="minus_one_one")
  x, _ = train(images, aug)
  step_cropped = np.abs(np.diff(np.asarray(x), axis=2)).mean()
  step_plain = np.abs(np.diff(images.astype(np.float32) / 127.5, axis=2)).mean()
  assert step_cropped < 0.5 * step_plain


# --- Mixing ---------------------------------------------------------------------------------


def constant_images(batch: int, size: int = 16) -> np.ndarray:
  """Image i is the constant 10 * i: pixels tell which image they came from."""
  return np.broadcast_to((10 * np.arange(batch, dtype=np.uint8))[:, None, None, None],
                         (batch, size, size, 3)).copy()


MIX = dict(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.5, normalize="minus_one_one")


@functools.cache
def mixed_batches(batch: int = 8) -> tuple:
  """(kind, pixels, targets) of constant images under MIX for 24 keys: one compiled program
  serves all the mixing tests."""
  images = constant_images(batch)
  plain = np.asarray(evaluate(images, make_aug(**MIX)))
  results = []
  for key in range(24):
    x, targets = train(images, make_aug(**MIX), key=key, labels=np.arange(batch))
    x, targets = np.asarray(x), np.asarray(targets)
    pixels = np.rint((x + 1) * 127.5)
    if np.array_equal(x, plain):
      kind = "none"
    elif np.isin(pixels, 10 * np.arange(batch)).all():
      kind = "cutmix"  # every pixel comes from one image
    else:
      kind = "mixup"
    results.append((kind, x, pixels, targets))
  return tuple(results)


def test_mix_prob_and_switch_prob_choose_per_batch():
  """mix_prob 0.5, both ops: batches are left alone, cut or blended, each often enough."""
  kinds = [kind for kind, *_ in mixed_batches()]
  assert {"none", "cutmix", "mixup"} == set(kinds)
  assert 6 <= kinds.count("none") <= 18
  for kind, _, _, targets in mixed_batches():
    if kind == "none":
      np.testing.assert_array_equal(targets, np.eye(NUM_CLASSES)[:8])


def test_cutmix_target_weight_is_the_pasted_area():
  batch = 8
  for kind, _, pixels, targets in mixed_batches(batch):
    if kind != "cutmix":
      continue
    for i in range(batch):
      partner = batch - 1 - i
      pasted = (pixels[i] == 10 * partner).all(-1)
      assert (pasted ^ (pixels[i] == 10 * i).all(-1)).all()
      rows, cols = np.nonzero(pasted)
      if rows.size:  # one axis-aligned box, the same for every image
        assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
      fraction = pasted.mean()
      np.testing.assert_allclose(targets[i, i], 1 - fraction, atol=1e-6)
      np.testing.assert_allclose(targets[i, partner], fraction, atol=1e-6)
      np.testing.assert_allclose(targets[i].sum(), 1.0, rtol=1e-6)


def test_mixup_blends_each_image_with_its_batch_mirror():
  batch = 8
  plain = constant_images(batch).astype(np.float32) / 127.5 - 1
  for kind, x, _, targets in mixed_batches(batch):
    if kind != "mixup":
      continue
    lam = targets[0, 0]
    assert 0 < lam < 1
    np.testing.assert_allclose(x, lam * plain + (1 - lam) * plain[::-1], atol=1e-5)
    expected = lam * np.eye(NUM_CLASSES)[:8] + (1 - lam) * np.eye(NUM_CLASSES)[7::-1]
    np.testing.assert_allclose(targets, expected, atol=1e-6)


# --- Random erasing ------------------------------------------------------------------------


def test_random_erasing_always_erases_one_rectangle():
  images = random_images(32, 16, 3)
  aug = make_aug(random_erasing=1.0, normalize="minus_one_one")
  x, _ = train(images, aug)
  changed = (np.asarray(x) != np.asarray(evaluate(images, aug))).any(-1)
  for mask in changed:
    rows, cols = np.nonzero(mask)
    assert rows.size  # every image erased
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    # Noise equals the pixel it replaces with probability ~0: the box is (almost) all changed.
    assert box.mean() > 0.95
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) / mask.size
    assert 0.01 <= area <= 0.45  # 0.02..1/3 before rounding the sides to pixels


def test_random_erasing_with_probability_zero_changes_nothing():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)
  erase = jax.jit(augment._random_erasing, static_argnums=2)
  np.testing.assert_array_equal(erase(jax.random.key(0), x, 0.0), x)


def test_erasing_noise_has_zero_mean_and_unit_variance():
  noise = np.asarray(augment._unit_noise(jax.random.key(0), (200_000,)))
  assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
  assert abs(np.mean(noise**4) - 3) < 0.4  # close to a Gaussian's kurtosis (Irwin-Hall: 2.7)


# --- RandAugment --------------------------------------------------------------------------


def test_rand_augment_stays_in_range_and_changes_images():
  images = random_images(32, 16, 3)
  aug = make_aug(randaugment_layers=2, randaugment_magnitude=9, normalize="minus_one_one")
  x1, _ = train(images, aug, key=4)
  assert x1.min() >= -1.0 and x1.max() <= 1.0
  changed = (np.asarray(x1) != np.asarray(evaluate(images, aug))).any(axis=(1, 2, 3))
  assert changed.mean() > 0.7  # only identity twice (1/169) or no-op draws keep an image


@pytest.mark.parametrize("op,reference", [
    ("identity", lambda x, f: x),
    ("brightness", lambda x, f: x * f),
    ("color", lambda x, f: gray(x) + f * (x - gray(x))),
    ("contrast", lambda x, f: gray(x).mean() + f * (x - gray(x).mean())),
    ("solarize", lambda x, f: np.where(x >= 256 * (1 - 0.9), 255 - x, x)),
    ("posterize", lambda x, f: np.floor(x / 8) * 8),  # M=9 keeps 8 - 3 bits
    ("autocontrast", lambda x, f: (x - x.min((0, 1))) * 255 / (x.max((0, 1)) - x.min((0, 1)))),
])
def test_rand_augment_colour_ops(op, reference):
  x_HxWxC = np.random.default_rng(1).uniform(0, 255, (6, 6, 3)).astype(np.float32)
  signed_level = -0.9  # M=9, negative sign: factor f = 1 - 0.81
  out = rand_augment_color(jnp.asarray(x_HxWxC)[None], jnp.array([randaugment.OP[op]]),
                                    jnp.array([signed_level]), 0.9)
  expected = np.clip(reference(x_HxWxC, 1 + 0.9 * signed_level), 0, 255)
  np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-3)


def test_rand_augment_sharpness_blends_with_pil_smooth():
  x_HxWxC = np.random.default_rng(2).uniform(0, 255, (5, 6, 1)).astype(np.float32)
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
  smooth = x_HxWxC.copy()
  for i in range(1, 4):
    for j in range(1, 5):
      smooth[i, j, 0] = (x_HxWxC[i - 1:i + 2, j - 1:j + 2, 0] * kernel).sum()
  factor = 1.5
  out = rand_augment_color(jnp.asarray(x_HxWxC)[None],
                                    jnp.array([randaugment.OP["sharpness"]]),
                                    jnp.array([(factor - 1) / 0.9]), 0.5)
  np.testing.assert_allclose(out[0], np.clip(smooth + factor * (x_HxWxC - smooth), 0, 255),
                             rtol=1e-5, atol=1e-3)


def test_rand_augment_translate_moves_pixels_and_fills_grey():
  """translate_x by 0.45 * level of the width, the uncovered columns grey 128."""
  x = jnp.asarray(random_images(1, 20, 1), jnp.float32)
  matrix = randaugment.geometric_matrix(jnp.array([randaugment.OP["translate_x"]]),
                                        jnp.array([0.5]), 20, 20)
  out = warp(x, matrix, (20, 20), fill=128.0)
  # Column c reads c + 0.45 * 0.5 * 20 = c + 4.5: the mean of columns c + 4 and c + 5.
  np.testing.assert_allclose(out[0, :, :15], (x[0, :, 4:19] + x[0, :, 5:20]) / 2, rtol=1e-6)
  np.testing.assert_allclose(out[0, :, 15], (x[0, :, 19] + 128) / 2, rtol=1e-6)
  np.testing.assert_array_equal(out[0, :, 16:], 128.0)


def gray(x_HxWxC: np.ndarray) -> np.ndarray:
  return (x_HxWxC @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
