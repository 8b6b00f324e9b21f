"""Pictures: the attention maths on cases worked out by hand, and the PNG files."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import config as config_lib
from vit_jax.tools import visualize
from vit_jax.train import report, state as state_lib, workdir as workdir_lib


def softmax_rows(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def png_size(path: str) -> tuple[int, int]:
  with Image.open(path) as pil:
    assert pil.format == "PNG"
    pil.load()  # A truncated file fails here.
    return pil.size


def inches_to_pixels(width: float, height: float) -> tuple[int, int]:
  return round(width * report.DPI), round(height * report.DPI)


# --- Attention maths -------------------------------------------------------------------


@pytest.mark.parametrize("class_token", [True, False])
def test_maps_of_random_attention_are_distributions(class_token):
  rng = np.random.default_rng(0)
  tokens = 9 + class_token  # A 3 x 3 grid of patches.
  weights = tuple(softmax_rows(rng.normal(size=(2, 4, tokens, tokens))) for _ in range(3))
  rollout = visualize.attention_rollout(weights, class_token)
  heads = visualize.last_layer_head_maps(weights, class_token)
  assert rollout.shape == (2, 3, 3) and heads.shape == (2, 4, 3, 3)
  assert np.all(rollout > 0) and np.all(heads > 0)
  np.testing.assert_allclose(rollout.sum((-2, -1)), 1.0, atol=1e-12)
  np.testing.assert_allclose(heads.sum((-2, -1)), 1.0, atol=1e-12)


def test_rollout_of_identity_attention():
  identity = np.broadcast_to(np.eye(5), (1, 2, 5, 5))
  # Without a class token every token keeps only itself: the mean over queries is uniform.
  np.testing.assert_allclose(visualize.attention_rollout((identity[..., 1:, 1:],) * 3, False),
                             np.full((1, 2, 2), 0.25))
  # With one, the class token never looks at a patch: nothing to show, all zeros.
  np.testing.assert_array_equal(visualize.attention_rollout((identity,) * 3, True),
                                np.zeros((1, 2, 2)))


@pytest.mark.parametrize("class_token", [True, False])
def test_register_tokens_are_not_patches(class_token):
  # Tokens: [class], 2 registers, 2 x 2 patches. Every query reads register 0 half the time
  # and patch (1, 0) the other half: the map holds that patch only.
  prefix = class_token + 2
  weights_1x1xTxT = np.zeros((1, 1, prefix + 4, prefix + 4))
  weights_1x1xTxT[..., int(class_token)] = 0.5  # Register 0 (an int: a bool would mask).
  weights_1x1xTxT[..., prefix + 2] = 0.5
  heads = visualize.last_layer_head_maps((weights_1x1xTxT,), class_token, num_registers=2)
  np.testing.assert_array_equal(heads[0, 0], [[0.0, 0.0], [1.0, 0.0]])


def test_rollout_of_uniform_attention_is_uniform():
  for class_token in (True, False):
    tokens = 4 + class_token
    uniform = np.full((1, 3, tokens, tokens), 1 / tokens)
    np.testing.assert_allclose(visualize.attention_rollout((uniform,) * 4, class_token)[0],
                               np.full((2, 2), 0.25))


def test_rollout_follows_attention_through_the_layers():
  # Tokens: 0 = class, 1..4 = patches (2 x 2). Layer 1: patch token 2 reads patch token 3.
  # Layer 2: the class token reads patch token 2. Each layer is (W + I) / 2, so
  # rollout row 0 = 0.5 e0 + 0.5 * (layer 1 row 2) = 0.5 e0 + 0.25 e2 + 0.25 e3.
  first = np.eye(5)
  first[2] = np.eye(5)[3]
  second = np.eye(5)
  second[0] = np.eye(5)[2]
  weights = (first[None, None], second[None, None])
  np.testing.assert_allclose(visualize.attention_rollout(weights, True)[0],
                             [[0.0, 0.5], [0.5, 0.0]])
  # Only the last layer: the class token reads patch token 2 alone.
  np.testing.assert_allclose(visualize.last_layer_head_maps(weights, True)[0, 0],
                             [[0.0, 1.0], [0.0, 0.0]])


def test_head_maps_read_each_head():
  # Head 0: class token 50% on itself, 50% on patch token 4. Head 1: uniform over patches.
  attn = np.full((1, 2, 5, 5), 0.2)
  attn[0, 0, 0] = [0.5, 0, 0, 0, 0.5]
  attn[0, 1, 0] = [0.0, 0.25, 0.25, 0.25, 0.25]
  maps = visualize.last_layer_head_maps((attn,), True)
  np.testing.assert_allclose(maps[0, 0], [[0, 0], [0, 1]])
  np.testing.assert_allclose(maps[0, 1], np.full((2, 2), 0.25))
  # Without a class token: the mean over all queries' rows.
  no_cls = np.zeros((1, 1, 4, 4))
  no_cls[0, 0, :, 1] = 1.0  # Every token reads token 1.
  np.testing.assert_allclose(visualize.last_layer_head_maps((no_cls,), False)[0, 0],
                             [[0, 1], [0, 0]])


# --- Figures -------------------------------------------------------------------------


def test_patch_mosaic_places_every_patch():
  image = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12, 1)
  mosaic = visualize.patch_mosaic(image, 4)  # 2 x 3 patches, gaps of 1 pixel.
  assert mosaic.shape == (2 * 4 + 1, 3 * 4 + 2, 1)
  np.testing.assert_array_equal(mosaic[5:9, 10:14], image[4:8, 8:12])
  assert np.all(mosaic[4] == 255) and np.all(mosaic[:, 4] == 255)
  with pytest.raises(ValueError, match="patches"):
    visualize.patch_mosaic(image, 5)


def test_patch_and_attention_pictures(tmp_path):
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
  path = visualize.plot_patches(grey, 4, str(tmp_path / "patches.png"))
  panel = visualize.PANEL_INCHES
  assert png_size(path) == inches_to_pixels(2 * panel, panel + 0.4)
  rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  maps = rng.random((9, 4, 4))  # 8 heads: 10 panels on 2 rows of MAX_COLUMNS.
  path = visualize.plot_attention(rgb, maps[0], maps[1:], "title", str(tmp_path / "a.png"))
  assert png_size(path) == inches_to_pixels(visualize.MAX_COLUMNS * panel, 2 * panel + 0.6)
  assert sorted(os.listdir(tmp_path)) == ["a.png", "patches.png"]  # No temporary files left.


def test_every_attention_map_has_a_colour_bar_of_its_scale():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  maps = rng.random((4, 4, 4))  # The rollout and 3 heads.
  maps /= maps.sum(axis=(1, 2), keepdims=True)
  fig = visualize.attention_figure(image, maps[0], maps[1:], "title")
  bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
  assert len(bars) == 4
  # Each bar runs from 0 to its own map's largest value (upsampled to the image).
  for bar, map_GxG in zip(bars, maps):
    norm = bar._colorbar.mappable.norm
    assert norm.vmin == 0
    np.testing.assert_allclose(norm.vmax, visualize.upsample(map_GxG, (16, 16)).max(),
                               rtol=1e-6)


@pytest.mark.parametrize("num_classes", [3, 100])
def test_confusion_matrix_picture(tmp_path, num_classes):
  confusion = np.arange(num_classes * num_classes).reshape(num_classes, num_classes)
  names = [f"class {k}" for k in range(num_classes)]
  path = report.plot_confusion_matrix(confusion, names, "title", str(tmp_path / "c.png"))
  side = min(3.0 + 0.45 * num_classes, 16.0)
  assert png_size(path) == inches_to_pixels(side + 1.5, side)
  assert os.listdir(tmp_path) == ["c.png"]


def write_metrics(workdir, with_val: bool) -> None:
  rows = [{"step": s, "train/loss": 2.0 / s ** 0.3, "train/lr": 1e-3}
          for s in range(10, 210, 10)]
  for s in (100, 200):
    rows.append({"step": s, "eval/loss": 1.0, "eval/top1": s / 250, "eval/top5": 0.95})
    if with_val:
      rows.append({"step": s, "val/loss": 1.1, "val/top1": s / 260, "val/top5": 0.9})
  rows.append({"step": 210, "train/loss": "nan"})  # Non-finite values are stored as text.
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def green_pixels(path: str) -> int:
  """Pixels of matplotlib's C2 (#2ca02c), the colour of the val lines."""
  with Image.open(path) as pil:
    rgb = np.asarray(pil.convert("RGB")).astype(int)
  return int(np.sum(np.abs(rgb - [0x2C, 0xA0, 0x2C]).sum(-1) < 30))


@pytest.mark.parametrize("with_val", [False, True])
def test_training_curves(tmp_path, with_val):
  write_metrics(tmp_path, with_val)
  path = report.plot_training_curves(str(tmp_path))
  assert path == str(tmp_path / "pictures" / "training_curves.png")
  width, height = report.CURVE_PANEL_INCHES
  assert png_size(path) == inches_to_pixels(3 * width, height)
  assert os.listdir(tmp_path / "pictures") == ["training_curves.png"]
  assert (green_pixels(path) > 100) == with_val


def test_training_curves_need_metrics(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics"):
    report.plot_training_curves(str(tmp_path))


# --- A workdir's pictures ------------------------------------------------------------


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
  """(workdir, Trained) of a 2-block model without a class token on a 2-class folder.

  Its parameters are random, drawn on the host and handed over in memory: initialising
  and checkpointing a model compiles for many seconds on 8 simulated devices, and
  test_predict.py covers loading a checkpoint.
  """
  root = tmp_path_factory.mktemp("random_run")
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      (root / "data" / split / name).mkdir(parents=True)
      for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            root / "data" / split / name / f"{i}.png")
  config = config_lib.get_base_config()
  config.dataset, config.data_dir, config.image_size = "folder", str(root / "data"), 16
  config.model.overrides.update(dict(width=16, depth=2, num_heads=2, mlp_dim=32,
                                     class_token=False, pool="gap"))
  workdir = root / "workdir"
  workdir.mkdir()
  mean_C, std_C = np.full(3, 127.0), np.full(3, 70.0)
  workdir_lib.write_run_files(str(workdir), config, class_names=["cat", "dog"],
                            image_shape=(16, 16, 3), mean_C=mean_C, std_C=std_C)
  model = state_lib.build_model(config, 2)
  shapes = jax.eval_shape(lambda: state_lib.init_params(model, 0, (16, 16, 3)))
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0.0, 0.5, s.shape).astype(s.dtype), shapes)
  return workdir, workdir_lib.Trained(config, model, params, 7, ["cat", "dog"], mean_C, std_C)


@pytest.fixture
def random_workdir(random_run, monkeypatch):
  workdir, trained = random_run
  monkeypatch.setattr(workdir_lib, "load_trained", lambda w, which: trained)
  return workdir


def test_make_pictures_of_the_eval_split(random_workdir):
  (random_workdir / "metrics.jsonl").unlink(missing_ok=True)
  (random_workdir / "eval_per_class.json").unlink(missing_ok=True)
  written = visualize.make_pictures(str(random_workdir), [], "best")
  names = sorted(os.path.basename(p) for p in written)
  # No metrics.jsonl: no curves. The eval split ("test") has 4 images: all are drawn, and
  # scored for the confusion matrix (no --mode=eval before).
  assert names == sorted(["confusion_matrix.png"] + [
      f"{kind}_test_{i}.png" for kind in ("attention", "patches") for i in range(4)])
  panel = visualize.PANEL_INCHES
  for path in written:
    assert os.path.dirname(path) == str(random_workdir / "pictures")
    expected = (inches_to_pixels(4 * panel, panel + 0.6) if "attention" in path
                else inches_to_pixels(2 * panel, panel + 0.4) if "patches" in path
                else inches_to_pixels(3.0 + 0.45 * 2 + 1.5, 3.0 + 0.45 * 2))
    assert png_size(path) == expected
  assert any(name.startswith("events") for name in os.listdir(random_workdir / "tensorboard"))
  per_class = json.loads((random_workdir / "eval_per_class.json").read_text())
  assert (per_class["step"], per_class["checkpoint"], per_class["split"]) == (7, "best", "test")
  assert np.sum(per_class["confusion_matrix"]) == per_class["eval/num_examples"] == 4
  assert [row["examples"] for row in per_class["per_class"]] == [2, 2]


def test_make_pictures_of_files(random_workdir, tmp_path, capsys):
  write_metrics(random_workdir, with_val=False)
  grey = tmp_path / "odd grey.jpg"
  Image.new("L", (30, 17), 128).save(grey)
  # The confusion matrix of this step, as --mode=eval saved it: drawn, not recomputed.
  saved = {"step": 7, "checkpoint": "best", "split": "test", "eval/top1": 0.25,
           "eval/num_examples": 4, "confusion_matrix": [[1, 1], [2, 0]]}
  (random_workdir / "eval_per_class.json").write_text(json.dumps(saved))
  written = visualize.make_pictures(str(random_workdir),
                                    [str(grey), str(tmp_path / "missing.png")], "best")
  assert [os.path.basename(p) for p in written] == [
      "training_curves.png", "confusion_matrix.png", "patches_00_odd-grey.png",
      "attention_00_odd-grey.png"]
  assert json.loads((random_workdir / "eval_per_class.json").read_text()) == saved
  assert "missing.png" in capsys.readouterr().err


def test_model_view_is_the_image_at_model_size():
  config = config_lib.get_base_config()
  config.image_size = 8
  trained = workdir_lib.Trained(config, None, None, 0, [], np.zeros(3), np.ones(3))
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(visualize.model_view(trained, images), images)
  assert visualize.model_view(trained, np.zeros((1, 20, 20, 1), np.uint8)).shape == (1, 8, 8, 1)
  # A photo run's images arrive cropped on the host (as the model saw them): not again.
  config.aug.eval_crop_fraction = 0.875
  photos = workdir_lib.Trained(config, None, None, 0, [], np.zeros(3), np.ones(3),
                               host_crops=True)
  np.testing.assert_array_equal(visualize.model_view(photos, images), images)
