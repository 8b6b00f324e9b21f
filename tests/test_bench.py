"""Benchmark mode: every reported field, FLOP counts against the analytic formula, peaks.

Nothing here asserts a speed: only that the numbers exist, have the right types and are
in sane ranges. Tiny models and few steps keep each run to seconds.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vit_jax import config as config_lib, models
from vit_jax.data import catalog
from vit_jax.tools import bench, flops

REPO = pathlib.Path(__file__).resolve().parents[1]

# The 2-block, 32-wide ViT of the train tests, on 8 simulated devices: batch 16.
TINY_OVERRIDES = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
NUMBER_KEYS = ("train/images_per_sec", "train/step_ms", "train/flops_per_image",
               "train/model_flops_per_image", "train/tflops_per_sec", "train/mfu",
               "device/peak_tflops", "eval/images_per_sec", "eval/step_ms", "compile_s")
INT_KEYS = ("devices", "batch_size", "params")
STR_KEYS = ("train/flops_source", "dtype", "jax_version", "model", "device/peak_source")


def _forward_mflops(img, patch, chans, width, depth, heads, head_dim, mlp, cls_token, head,
                    flatten_head, classes):
  """The analytic count of /work/shared/peers/vit_flops.py: 2*M*N*K of every dense layer,
  Q.K^T and P.V; elementwise ops not counted."""
  n_patch = (img // patch) ** 2
  t = n_patch + int(cls_token)
  inner = heads * head_dim
  per_layer = 3 * t * width * inner * 2 + 2 * heads * t * t * head_dim * 2 + t * inner * width * 2
  prev = width
  for m in mlp:
    per_layer += t * prev * m * 2
    prev = m
  total = n_patch * patch * patch * chans * width * 2 + depth * per_layer
  prev = t * width if flatten_head else width
  for m in list(head) + [classes]:
    total += prev * m * 2
    prev = m
  return total / 1e6


@pytest.mark.parametrize("name,image_size,formula_mflops,published_mflops", [
    ("ViT-Ti/4", 32, _forward_mflops(32, 4, 3, 192, 12, 3, 64, [768, 192], True, [], False,
                                     100), 730.3),
    ("keras-example", 72, _forward_mflops(72, 6, 3, 64, 8, 4, 64, [128, 64], False,
                                          [2048, 1024], True, 100), 402.8),
])
def test_forward_matmul_flops_equal_the_formula(name, image_size, formula_mflops,
                                                published_mflops):
  model = models.create_model(name, num_classes=100)
  counted = flops.forward_matmul_flops(model, (image_size, image_size, 3)) / 1e6
  assert counted == pytest.approx(formula_mflops, rel=1e-6)  # Exact up to float rounding.
  assert counted == pytest.approx(published_mflops, abs=0.1)  # The peers' README (1 d.p.).


def test_matmul_flops_count_scanned_layers_once_per_layer():
  unrolled = models.create_model("ViT-Ti/4", num_classes=10, **TINY_OVERRIDES)
  scanned = models.create_model("ViT-Ti/4", num_classes=10, scan_layers=True, remat=True,
                                **TINY_OVERRIDES)
  assert flops.forward_matmul_flops(scanned, (32, 32, 3)) == pytest.approx(
      flops.forward_matmul_flops(unrolled, (32, 32, 3)))


def test_dataset_shapes_come_without_downloading():
  config = config_lib.get_base_config()
  assert catalog.dataset_shape(config) == ((32, 32, 3), 100, False)  # cifar100
  config.dataset = "fashion_mnist"
  assert catalog.dataset_shape(config) == ((28, 28, 1), 10, False)
  config.dataset, config.image_size = "imagenet2012", 224
  assert catalog.dataset_shape(config) == ((224, 224, 3), 1000, True)
  config.dataset = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="does not know the image shape"):
    catalog.dataset_shape(config)


def test_image_folder_layout_is_photos_cropped_on_the_host(tmp_path):
  for label in ("cat", "dog"):
    (tmp_path / "train" / label).mkdir(parents=True)
    Image.new("RGB", (50, 40)).save(tmp_path / "train" / label / "a.jpg")
  config = config_lib.get_base_config()
  config.dataset, config.data_dir, config.image_size = "folder", str(tmp_path), 48
  config.train_split = "train"
  # Bench mode then leaves the crop and flip out of the step, as training on them does.
  assert catalog.dataset_shape(config) == ((48, 48, 3), 2, True)


def test_peak_table():
  assert flops.table_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert flops.table_peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 494.0
  assert flops.table_peak_tflops("TPU v4", "float32") == 275.0
  assert flops.table_peak_tflops("cpu", "float32") is None
  # Names inside other names: the longer one first.
  assert flops.table_peak_tflops("NVIDIA H100 NVL", "bfloat16") == 835.0
  assert flops.table_peak_tflops("NVIDIA L40", "bfloat16") == 181.0
  assert flops.table_peak_tflops("NVIDIA L40S", "bfloat16") == 362.0
  assert flops.table_peak_tflops("NVIDIA L4", "bfloat16") == 121.0
  assert flops.table_peak_tflops("TPU v3", "bfloat16") == 61.5  # A core: half a chip.


def _tiny_config(dataset: str = "cifar100") -> ml_collections.ConfigDict:
  config = config_lib.get_base_config()
  config.dataset = dataset
  config.image_size = 32 if dataset == "cifar100" else 28
  config.model.overrides.update(TINY_OVERRIDES)
  config.batch_size = config.eval_batch_size = 16
  config.bench.update(dict(warmup_steps=1, steps=2, eval_steps=1, input_batches=2,
                           matmul_size=256, matmul_reps=2))
  return config


def _json_line(text: str) -> dict:
  lines = [line for line in text.splitlines() if line.startswith("{")]
  assert len(lines) == 1, text
  return json.loads(lines[0])


def _check_fields(result: dict, devices: int) -> None:
  for key in NUMBER_KEYS:
    assert isinstance(result[key], float) and result[key] > 0, key
  for key in INT_KEYS:
    assert isinstance(result[key], int) and result[key] > 0, key
  for key in STR_KEYS:
    assert isinstance(result[key], str) and result[key], key
  assert "input/images_per_sec" in result
  assert 0 < result["train/mfu"] < 1.5
  assert result["jax_version"] == jax.__version__
  assert result["devices"] == devices
  assert result["train/flops_source"] in ("xla_cost_analysis", "formula")
  # XLA counts every op (elementwise, optimiser) on top of the model's matmuls.
  assert 0.8 < result["train/flops_per_image"] / result["train/model_flops_per_image"] < 5
  assert result["train/step_ms_min"] <= result["train/step_ms"] <= result["train/step_ms_max"]


def test_bench_run_reports_every_field(capsys, tmp_path):
  config = _tiny_config()
  config.data_dir = str(tmp_path)  # No cifar100 here: the input rate is skipped, not fetched.
  result = bench.run(config)
  printed = _json_line(capsys.readouterr().out)
  assert printed == json.loads(json.dumps(result))
  _check_fields(printed, jax.device_count())
  assert printed["input/images_per_sec"] is None
  assert "not prepared" in printed["input/skipped"]
  assert printed["batch_size"] == 16 and printed["model"] == "ViT-Ti/4"
  assert printed["params"] == models.count_params(
      models.create_model("ViT-Ti/4", num_classes=100, **TINY_OVERRIDES), 32)


def test_bench_times_the_step_with_weight_ema_and_flipped_evaluation(capsys, tmp_path):
  config = _tiny_config()
  config.data_dir = str(tmp_path)
  config.ema_decay, config.aug.eval_flip = 0.999, True
  config.bench.matmul_size = 0
  result = bench.run(config)
  assert result["train/images_per_sec"] > 0 and result["eval/images_per_sec"] > 0
  assert np.isfinite(result["train/final_loss"])


def test_bench_measures_the_input_pipeline_when_the_data_is_there(capsys, fashion_mnist_dirs):
  config = _tiny_config("fashion_mnist")
  config.manual_dir, config.data_dir = fashion_mnist_dirs
  config.train_split = "train[:2048]"
  result = bench.run(config)
  _check_fields(_json_line(capsys.readouterr().out), jax.device_count())
  assert result["input/images_per_sec"] > 0 and result["input/skipped"] is None
  assert result["input_shape"] == [28, 28, 1] and result["num_classes"] == 10


def test_main_bench_mode_prints_the_table_and_one_json_line(tmp_path):
  cache = tmp_path / "xla_cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  # Every program cached, however fast it compiles: by default only those taking over a
  # second are, and a small one that crosses the second under load on the rerun only
  # would look like a cache miss.
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

  def bench_run() -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--mode=bench", "--config=configs/cifar100.py",
         f"--config.data_dir={tmp_path}", "--config.batch_size=16",
         "--config.eval_batch_size=16", "--config.model.name=ViT-Ti/4",
         *[f"--config.model.overrides.{k}={v}" for k, v in TINY_OVERRIDES.items()],
         "--config.aug.randaugment_layers=0", f"--config.compilation_cache_dir={cache}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out

  out = bench_run()
  result = _json_line(out.stdout)
  _check_fields(result, devices=2)
  for label in ("train", "eval", "input", "compile", "devices"):
    assert any(line.startswith(label) for line in out.stdout.splitlines()), label
  # The model as the config builds it: the registry's name and the fields it overrides.
  # (configs/cifar100.py sets stochastic depth; the flags set the rest.)
  assert result["model_overrides"] == {**TINY_OVERRIDES, "stochastic_depth_rate": 0.1}
  overrides = ", ".join(f"{k}={v}" for k, v in result["model_overrides"].items())
  assert ["model", f"ViT-Ti/4 with overrides {overrides} ({result['params']:,} params), "
          "float32"] in [line.split(maxsplit=1) for line in out.stdout.splitlines()]
  # The persistent compilation cache: the first run writes the compiled train step, a
  # rerun finds it (and writes nothing new).
  entries = sorted(p.name for p in cache.iterdir())
  assert any("train_step" in name for name in entries), entries
  bench_run()
  assert sorted(p.name for p in cache.iterdir()) == entries


def test_bench_mode_needs_neither_tfds_nor_tensorflow(tmp_path):
  """The GPU machines' images hold jax, flax, optax and orbax but not TFDS or TensorFlow:
  bench mode runs there, skipping the input pipeline's rate and saying why."""
  argv = ["main.py", "--mode=bench", "--config=configs/cifar100.py",
          f"--config.data_dir={tmp_path}", "--config.batch_size=8", "--config.eval_batch_size=8",
          *[f"--config.model.overrides.{k}={v}" for k, v in TINY_OVERRIDES.items()],
          "--config.aug.randaugment_layers=0", "--config.bench.steps=1",
          "--config.bench.input_batches=2", f"--config.compilation_cache_dir={tmp_path}/xla"]
  # A module set to None in sys.modules cannot be imported: as if it were not installed.
  code = ("import runpy, sys; sys.modules.update(tensorflow_datasets=None, tensorflow=None); "
          f"sys.argv = {argv!r}; runpy.run_path('main.py', run_name='__main__')")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = _json_line(out.stdout)
  _check_fields(result, devices=1)
  assert result["input/images_per_sec"] is None
  assert result["input/skipped"] == ("ModuleNotFoundError: import of tensorflow_datasets "
                                     "halted; None in sys.modules")


def test_conv_stem_benchmark_runs_both_forms_on_the_same_parameters():
  spec = importlib.util.spec_from_file_location("conv_stem_bench",
                                                REPO / "benchmarks" / "conv_stem.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = module.run(batch=2, image_size=8, channels=2, patch=4, features=3, width=8, reps=1)
  assert result["xla_conv_ms"] > 0 and result["vit_jax_ms"] > 0
  assert result["max_abs_diff"] < 1e-5  # The same function: only float rounding differs.


@pytest.mark.parametrize("loop", ["scan_layers", "accum_steps"])
def test_steps_with_loops_count_flops_by_the_formula(loop):
  """XLA's cost analysis counts a loop's body once: ViT-Ti/4's scanned forward pass came
  out at 0.063 GFLOP against 0.740 unrolled. Such steps take the model's count (never
  XLA's, so the compiled step is not read)."""
  config = config_lib.get_base_config()
  config.model.overrides.update(TINY_OVERRIDES)
  config.bench.matmul_size = 0
  if loop == "scan_layers":
    config.scan_layers = True
  else:
    config.optim.accum_steps = 2
  model = models.create_model(config.model.name, num_classes=10, **TINY_OVERRIDES)
  counts = bench._flops_and_peak(config, {"model": model, "input_shape": (32, 32, 3),
                                           "train": None})
  assert counts["train/flops_source"] == "formula"
  assert counts["train/flops_per_image"] == counts["train/model_flops_per_image"] > 0
