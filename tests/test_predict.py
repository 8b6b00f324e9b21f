"""Prediction from a workdir: a tiny ViT trained on a task whose answers are certain
(images of one solid colour plus noise, one class per colour), then files of every kind."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_jax import config as config_lib, data, errors
from vit_jax.tools import predict
from vit_jax.train import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (220, 30, 30),
           "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
IMAGE_SIZE = 16


def colour_image(rgb, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  noise = rng.integers(-40, 41, (height, width, 3))
  return np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)


def write_colour_folders(root: Path, per_class: dict[str, int]) -> None:
  """root/SPLIT/COLOUR/i.png, 20 x 20 so that loading resizes them as it would any file."""
  rng = np.random.default_rng(0)
  for split, count in per_class.items():
    for name, rgb in COLOURS.items():
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        Image.fromarray(colour_image(rgb, 20, 20, rng)).save(root / split / name / f"{i}.png")


def colour_config(data_dir: Path):
  config = config_lib.get_base_config()
  config.dataset, config.data_dir = "folder", str(data_dir)
  config.image_size = IMAGE_SIZE
  config.model.overrides.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  config.batch_size, config.eval_batch_size = 32, 16
  # One evaluation and one checkpoint, at the end: "best" is the trained model.
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 60
  config.log_every_steps = 60
  config.optim.lr, config.optim.warmup_steps = 3e-3, 3
  return config


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory) -> tuple[str, Path]:
  """(workdir, data root) of a run that tells the colours apart (test top-1 = 1.0)."""
  from vit_jax import train
  root = tmp_path_factory.mktemp("colours")
  write_colour_folders(root / "data", {"train": 30, "test": 8})
  workdir = str(root / "workdir")
  final = train.train_and_evaluate(colour_config(root / "data"), workdir)
  assert final["eval/top1"] == 1.0
  return workdir, root / "data"


def check_top5(top5: list[dict]) -> None:
  assert len(top5) == 5
  assert all(entry.keys() == {"label", "prob"} for entry in top5)
  assert len({entry["label"] for entry in top5}) == 5
  assert set(entry["label"] for entry in top5) <= set(COLOURS)
  probs = [entry["prob"] for entry in top5]
  assert probs == sorted(probs, reverse=True)
  assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-5


def test_json_predictions_of_test_images_are_right(colour_run, capsys):
  workdir, root = colour_run
  folders = [str(root / "test" / name) for name in COLOURS]
  results = predict.predict_files(workdir, folders, fmt="json")
  printed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert printed == results
  assert len(results) == 8 * len(COLOURS)
  # Folders expand to their files in name order.
  assert [r["image"] for r in results[:8]] == [
      os.path.join(folders[0], name) for name in sorted(os.listdir(folders[0]))]
  for result in results:
    assert result.keys() == {"image", "top5"}
    check_top5(result["top5"])
    assert result["top5"][0]["label"] == Path(result["image"]).parent.name
    assert result["top5"][0]["prob"] > 0.6


def test_files_are_read_as_the_dataset_reads_them(colour_run):
  workdir, root = colour_run
  paths = sorted(str(p) for p in (root / "test").glob("*/*.png"))
  config = colour_config(root)
  source = data.load_source(config, "test")
  assert workdir_lib.load_run(workdir)["host_crops"] is True  # A run on a photo folder.
  readable, images, errors = predict.read_images(
      paths, (IMAGE_SIZE, IMAGE_SIZE, 3), config.aug.eval_crop_fraction)
  assert readable == paths and not errors
  # Same pixels, bit for bit (the folder source holds them in its own order).
  evaluated = source.get(np.arange(len(source)))["image"]
  assert sorted(x.tobytes() for x in images) == sorted(x.tobytes() for x in evaluated)


def test_grey_rgb_other_formats_and_odd_sizes(colour_run, tmp_path):
  workdir, _ = colour_run
  rng = np.random.default_rng(1)
  files = {  # file -> (image, expected label)
      "white_grey.png": (Image.new("L", (30, 30), 255), "white"),
      "black_grey_odd.jpg": (Image.new("L", (7, 50), 0), "black"),
      "red_wide.jpg": (Image.fromarray(colour_image(COLOURS["red"], 45, 123, rng)), "red"),
      "blue_rgba.png": (Image.new("RGBA", (16, 16), (*COLOURS["blue"], 255)), "blue"),
      "green_palette.png": (Image.new("RGB", (9, 9), COLOURS["green"]).convert("P"), "green"),
      "yellow_tall.jpeg": (Image.new("RGB", (17, 301), COLOURS["yellow"]), "yellow"),
  }
  for name, (image, _) in files.items():
    image.save(tmp_path / name)
  results = predict.predict_files(workdir, [str(tmp_path)])
  assert [Path(r["image"]).name for r in results] == sorted(files)
  for result in results:
    assert result["top5"][0]["label"] == files[Path(result["image"]).name][1]


def test_unreadable_files_are_reported_and_the_rest_predicted(colour_run, tmp_path, capsys):
  workdir, root = colour_run
  good = str(root / "test" / "red" / "0.png")
  missing = str(tmp_path / "missing.png")
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8 this is not a JPEG")
  results = predict.predict_files(workdir, [missing, good, str(corrupt)], fmt="json")
  out = capsys.readouterr()
  assert [r["image"] for r in results] == [missing, good, str(corrupt)]
  for bad in (results[0], results[2]):
    assert bad.keys() == {"image", "error"}
    assert bad["image"] in bad["error"] and bad["image"] in out.err
  assert results[1]["top5"][0]["label"] == "red"
  assert [json.loads(line) for line in out.out.strip().splitlines()] == results

  predict.predict_files(workdir, [missing, good], fmt="table")
  table = capsys.readouterr()
  assert table.out.splitlines()[0] == good
  assert table.out.splitlines()[1].split()[0] == "1." and "red" in table.out.splitlines()[1]
  assert missing not in table.out and missing in table.err


def test_command_fails_only_when_no_image_can_be_read(colour_run, tmp_path):
  workdir, _ = colour_run
  with pytest.raises(errors.NoReadableImageError):
    predict.predict_files(workdir, [str(tmp_path / "missing.png")])
  missing = str(tmp_path / "also_missing.png")
  out = subprocess.run([sys.executable, str(REPO / "main.py"), "--mode=predict",
                        f"--workdir={workdir}", f"--images={missing}", "--format=json"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert json.loads(out.stdout)["image"] == missing
  assert missing in out.stderr


def test_channels_follow_the_trained_model(tmp_path):
  rgb = (10, 200, 30)
  Image.new("RGB", (5, 7), rgb).save(tmp_path / "rgb.png")
  Image.new("L", (5, 7), 77).save(tmp_path / "grey.png")
  grey_of_rgb = predict.read_image(str(tmp_path / "rgb.png"), (4, 4, 1))
  assert grey_of_rgb.shape == (4, 4, 1) and grey_of_rgb.dtype == np.uint8
  # PIL's L: 0.299 R + 0.587 G + 0.114 B.
  assert np.all(np.abs(grey_of_rgb.astype(int) - 124) <= 1)
  rgb_of_grey = predict.read_image(str(tmp_path / "grey.png"), (4, 4, 3))
  assert rgb_of_grey.shape == (4, 4, 3) and np.all(rgb_of_grey == 77)
  assert np.all(predict.read_image(str(tmp_path / "rgb.png"), (3, 3, 3)) == rgb)


def test_eval_flip_of_the_run_predicts_an_image_and_its_mirror_alike(colour_run):
  workdir, _ = colour_run
  trained = workdir_lib.load_trained(workdir)
  assert trained.config.aug.eval_flip is False
  # Half one colour, half another: its mirror is another image to the model.
  images = np.zeros((4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for i, (left, right) in enumerate([("red", "blue"), ("white", "green"),
                                     ("yellow", "black"), ("blue", "white")]):
    images[i, :, :IMAGE_SIZE // 2], images[i, :, IMAGE_SIZE // 2:] = COLOURS[left], COLOURS[right]
  mirrored = images[:, :, ::-1]

  def probs(config):
    run = dataclasses.replace(trained, config=config)
    return [predict.run_batched(predict.make_forward(run), run.params, x, 4)
            for x in (images, mirrored)]

  single, single_mirrored = probs(trained.config)
  assert np.abs(single - single_mirrored).max() > 1e-3
  flip_config = trained.config.copy_and_resolve_references()
  flip_config.aug.eval_flip = True
  both, both_mirrored = probs(flip_config)
  np.testing.assert_allclose(both, both_mirrored, rtol=1e-5, atol=1e-6)
  assert np.abs(both - single).max() > 1e-3
  # visualize's forward (with the attention maps) predicts as predict's does.
  flip_run = dataclasses.replace(trained, config=flip_config)
  with_maps, _ = predict.run_batched(predict.make_forward(flip_run, attention=True),
                                     flip_run.params, images, 4)
  np.testing.assert_allclose(with_maps, both, rtol=1e-5, atol=1e-6)


def test_a_run_from_before_newer_keys_loads_as_it_ran(colour_run, tmp_path):
  workdir, _ = colour_run
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  saved = json.loads((old / "config.json").read_text())
  del saved["aug"]["eval_flip"], saved["input"]
  (old / "config.json").write_text(json.dumps(saved))
  trained = workdir_lib.load_trained(str(old))
  assert trained.config.aug.eval_flip is False and trained.config.input.worker_count == 0
  images = np.stack([colour_image(rgb, IMAGE_SIZE, IMAGE_SIZE, np.random.default_rng(0))
                     for rgb in COLOURS.values()])
  np.testing.assert_array_equal(
      predict.run_batched(predict.make_forward(trained), trained.params, images, 8),
      predict.run_batched(predict.make_forward(workdir_lib.load_trained(workdir)),
                          trained.params, images, 8))
