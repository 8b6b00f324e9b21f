r"""Benchmark mode: the real train and eval steps on synthetic data, FLOPs and MFU.

  python main.py --mode=bench --config=configs/cifar100.py:keras
  python main.py --mode=bench --config=configs/cifar100.py --config.batch_size=128
  # the model alone, without the random augmentation:
  python main.py --mode=bench --config=configs/cifar100.py:keras \
      --config.aug.flip=False --config.aug.rotate=0 --config.aug.zoom=0

What is timed:
* train: `steps.make_train_step` exactly as the training loop builds it (the config's
  augmentation, optimiser and sharding, state donated), on uint8 images of the dataset's
  stored shape (e.g. 32x32x3 for CIFAR-100, resized inside the step to image_size).
  `warmup_steps` untimed steps, then the median of `steps` timed steps; every step is
  synchronised by reading the loss back to the host and blocking on the new state.
* eval: `steps.make_eval_step` on the same kind of batch (eval_batch_size).
* input: `pipeline.measure_input_throughput` on the real training split, when the dataset
  is available without downloading; otherwise null and `input/skipped` says why.
* FLOPs: `train/flops_per_image` is XLA's cost analysis of the compiled train step
  (`train/flops_source` = "xla_cost_analysis"; every op, augmentation and optimiser
  included); where XLA gives none, or would count a loop's body once (scan_layers,
  accum_steps > 1), 3 x the forward matmul FLOPs ("formula").
  `train/model_flops_per_image` is the model-FLOPs convention of the peers and of MFU:
  3 x (2*M*N*K over every matmul and convolution of the forward pass), counted from the
  traced program, so it holds for any config or override.
* MFU = model FLOPs per second / peak. Peak: a table of accelerator peaks (dense
  bf16, or TF32 for float32 on GPUs) times the device count; on CPU the float32 matmul
  rate measured in this run (`device/peak_tflops`, `device/peak_source`).

Step counts and the peak measurement come from `config.bench` (vit_jax/config.py).
Prints a table, then one JSON line (every key of the returned dict).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vit_jax import data, parallel
from vit_jax.data import catalog, pipeline
from vit_jax.tools import flops
from vit_jax.train import optim, state as state_lib, steps

# Pixel statistics of uniform random uint8 images (the synthetic data), 0..255 units.
_SYNTHETIC_MEAN, _SYNTHETIC_STD = 127.5, 73.9


# --- Timing ------------------------------------------------------------------------------


def time_calls(call: Callable[[int], Any], warmup: int, n: int) -> list[float]:
  """Seconds of each of `n` calls after `warmup` calls; `call(i)` must synchronise."""
  for i in range(warmup):
    call(i)
  times = []
  for i in range(warmup, warmup + n):
    t0 = time.perf_counter()
    call(i)
    times.append(time.perf_counter() - t0)
  return times


def _synthetic_batches(shape_HWC, num_classes, batch_size, mesh, count, seed, mask=False):
  """`count` distinct global batches of uniform uint8 images and labels on the devices."""
  rng = np.random.default_rng(seed)
  sharding = parallel.batch_sharding(mesh)
  local = batch_size // jax.process_count()
  batches = []
  for _ in range(count):
    arrays = {"image": rng.integers(0, 256, (local, *shape_HWC), dtype=np.uint8),
              "label": rng.integers(0, num_classes, (local,)).astype(np.int32)}
    if mask:
      arrays["mask"] = np.ones((local,), bool)
    batches.append({k: jax.make_array_from_process_local_data(sharding, v,
                                                             (batch_size, *v.shape[1:]))
                    for k, v in arrays.items()})
  return batches


def _input_throughput(config, mesh, num_batches: int) -> tuple[float | None, str | None]:
  """(images/sec of the real input pipeline, None) or (None, why it was skipped)."""
  if num_batches <= 0:
    return None, "disabled (config.bench.input_batches=0)"
  try:
    if config.dataset != "folder":
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder(config.dataset, data_dir=config.data_dir)
      if not builder.is_prepared() and not config.manual_dir:
        return None, (f"{config.dataset} is not prepared in {builder.data_dir_root} and no "
                      "config.manual_dir is set (the benchmark does not download)")
    source = data.load_source(config, config.train_split)
    return pipeline.measure_input_throughput(source, config, mesh, num_batches), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"[:300]


# --- The benchmark -----------------------------------------------------------------------


def _compile(config, shape_HWC, num_classes, mesh) -> dict[str, Any]:
  """The config's model and train/eval steps, compiled for synthetic batches."""
  mean_C = np.full((shape_HWC[-1],), _SYNTHETIC_MEAN, np.float32)
  std_C = np.full((shape_HWC[-1],), _SYNTHETIC_STD, np.float32)
  model = state_lib.build_model(config, num_classes)
  input_shape = (config.image_size, config.image_size, shape_HWC[-1])
  abstract_params = jax.eval_shape(lambda: state_lib.init_params(model, config.seed,
                                                                 input_shape))
  tx = optim.make_optimizer(config, abstract_params)
  state, shardings = state_lib.create_state(model, tx, mesh, seed=config.seed,
                                            image_shape_HWC=input_shape, fsdp=config.fsdp,
                                            ema=config.ema_decay > 0)
  train_step = steps.make_train_step(config, model, tx, mesh, shardings,
                                     num_classes=num_classes, mean_C=mean_C, std_C=std_C)
  eval_step = steps.make_eval_step(config, model, mesh, shardings.params,
                                   mean_C=mean_C, std_C=std_C)
  train_batches = _synthetic_batches(shape_HWC, num_classes, config.batch_size, mesh, 2,
                                     seed=0)
  eval_batches = _synthetic_batches(shape_HWC, num_classes, config.eval_batch_size, mesh, 2,
                                    seed=1, mask=True)
  t0 = time.perf_counter()
  train_compiled = train_step.lower(state, train_batches[0]).compile()
  t1 = time.perf_counter()
  eval_compiled = eval_step.lower(state.params, eval_batches[0]).compile()
  t2 = time.perf_counter()
  return dict(model=model, input_shape=input_shape, state=state,
              num_params=sum(int(np.prod(x.shape))
                             for x in jax.tree_util.tree_leaves(abstract_params)),
              train=train_compiled, eval=eval_compiled, train_batches=train_batches,
              eval_batches=eval_batches, compile_s=t1 - t0, eval_compile_s=t2 - t1)


def _time_steps(built: dict[str, Any], opts) -> tuple[list[float], list[float], float]:
  """Seconds per train step, per eval step, and the last training loss."""
  holder = {"state": built["state"]}
  losses = []
  train_batches, eval_batches = built["train_batches"], built["eval_batches"]

  def train_call(i: int) -> None:
    new_state, m = built["train"](holder["state"], train_batches[i % len(train_batches)])
    losses.append(float(m["loss"]))  # Reads the loss back, as the peers do.
    holder["state"] = jax.block_until_ready(new_state)

  train_times = time_calls(train_call, opts.warmup_steps, opts.steps)
  params = holder["state"].params

  def eval_call(i: int) -> None:
    jax.block_until_ready(built["eval"](params, eval_batches[i % len(eval_batches)]))

  return train_times, time_calls(eval_call, 1, opts.eval_steps), losses[-1]


def _flops_and_peak(config, built: dict[str, Any]) -> dict[str, Any]:
  """FLOPs per trained image (XLA's count and the model convention) and the peak rate."""
  devices = jax.devices()
  device_kind, opts = devices[0].device_kind, config.bench
  model_flops = 3 * flops.forward_matmul_flops(built["model"], built["input_shape"])
  # XLA's cost analysis counts a loop's body once, not once per iteration: with scanned
  # blocks or accumulated micro-batches its figure is a fraction of the step's.
  loops = config.scan_layers or config.optim.accum_steps > 1
  counted = None if loops else flops.xla_flops(built["train"])
  if counted is not None:
    # The compiled program is one device's share of the SPMD step.
    flops_per_image = counted * len(devices) / config.batch_size
    flops_source = "xla_cost_analysis"
  else:
    flops_per_image, flops_source = model_flops, "formula"
  table_peak = flops.table_peak_tflops(device_kind, config.compute_dtype)
  if table_peak is not None:
    peak, peak_source = table_peak * len(devices), f"table ({device_kind} x {len(devices)})"
  elif devices[0].platform == "cpu" and opts.matmul_size > 0:
    # Simulated CPU devices share the host's cores: the host's rate is the peak.
    peak = flops.measure_matmul_tflops(opts.matmul_size, opts.matmul_reps)
    peak_source = f"measured f32 matmul {opts.matmul_size}^3 (jax.jit, median)"
  else:
    peak, peak_source = None, f"unknown device kind {device_kind!r}"
  return {"train/flops_per_image": flops_per_image, "train/flops_source": flops_source,
          "train/model_flops_per_image": model_flops, "device/peak_tflops": peak,
          "device/peak_source": peak_source}


def run(config: ml_collections.ConfigDict, *, verbose: bool = True) -> dict:
  """Times the config's train and eval steps; prints a table and one JSON line.

  Args:
    config: a validated config; `config.bench` sets the step counts.
    verbose: print the table and the JSON line (process 0).

  Returns:
    Every figure of the module docstring, by name.
  """
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.batch_size)
  parallel.check_batch_divides(config.eval_batch_size, "config.eval_batch_size")
  shape_HWC, num_classes, host_crops = catalog.dataset_shape(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    # The schedule needs a length; its value does not change the cost of a step.
    config.total_steps = config.total_steps or 10_000
  # Photos reach the device cropped (the input workers' job): the step does the rest.
  built = _compile(data.for_device(config, host_crops), shape_HWC,
                   num_classes, mesh)
  train_times, eval_times, final_loss = _time_steps(built, config.bench)
  counts = _flops_and_peak(config, built)
  input_ips, input_why = _input_throughput(config, mesh, config.bench.input_batches)

  device = jax.devices()[0]
  images_per_sec = config.batch_size / statistics.median(train_times)
  model_tflops = images_per_sec * counts["train/model_flops_per_image"] / 1e12
  peak = counts["device/peak_tflops"]
  result = {
      "model": config.model.name,
      "model_overrides": {k: v for k, v in config.model.overrides.to_dict().items()
                          if v is not None},
      "params": built["num_params"],
      "dataset": config.dataset,
      "input_shape": list(shape_HWC),
      "image_size": config.image_size,
      "num_classes": num_classes,
      "batch_size": config.batch_size,
      "eval_batch_size": config.eval_batch_size,
      "dtype": config.compute_dtype,
      "devices": jax.device_count(),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "jax_version": jax.__version__,
      "compile_s": built["compile_s"],
      "eval/compile_s": built["eval_compile_s"],
      "warmup_steps": config.bench.warmup_steps,
      "steps": config.bench.steps,
      "train/images_per_sec": images_per_sec,
      "train/step_ms": 1e3 * statistics.median(train_times),
      "train/step_ms_min": 1e3 * min(train_times),
      "train/step_ms_max": 1e3 * max(train_times),
      **counts,
      "train/tflops_per_sec": images_per_sec * counts["train/flops_per_image"] / 1e12,
      "train/model_tflops_per_sec": model_tflops,
      "train/mfu": model_tflops / peak if peak else None,
      "train/final_loss": final_loss,
      "eval/images_per_sec": config.eval_batch_size / statistics.median(eval_times),
      "eval/step_ms": 1e3 * statistics.median(eval_times),
      "input/images_per_sec": input_ips,
      "input/skipped": input_why,
  }
  if verbose and jax.process_index() == 0:
    print(format_table(result, config), flush=True)
    print(json.dumps(result), flush=True)
  return result


def _model_name(r: dict) -> str:
  """"ViT-Ti/4", or "ViT-Ti/4 with overrides width=128, depth=4" when fields are set."""
  overrides = ", ".join(f"{k}={v}" for k, v in r["model_overrides"].items())
  return f"{r['model']} with overrides {overrides}" if overrides else r["model"]


def format_table(r: dict, config: ml_collections.ConfigDict) -> str:
  def num(v, fmt):
    return "n/a" if v is None else format(v, fmt)

  aug = {k: v for k, v in config.aug.to_dict().items()
         if k in ("crop", "flip", "rotate", "zoom", "randaugment_layers", "mixup_alpha",
                  "cutmix_alpha", "random_erasing") and v not in (0, 0.0, False, "none")}
  rows = [
      ("model", f"{_model_name(r)} ({r['params']:,} params), {r['dtype']}"),
      ("input", f"synthetic uint8 {'x'.join(map(str, r['input_shape']))} -> "
                f"{r['image_size']} px, {r['num_classes']} classes; augmentation: "
                f"{aug or 'none'}"),
      ("devices", f"{r['devices']} x {r['device_kind']} ({r['platform']}), "
                  f"jax {r['jax_version']}"),
      ("batch", f"{r['batch_size']} train / {r['eval_batch_size']} eval"),
      ("compile", f"{r['compile_s']:.1f} s train, {r['eval/compile_s']:.1f} s eval"),
      ("train", f"{r['train/images_per_sec']:.1f} img/s, {r['train/step_ms']:.1f} ms/step "
                f"(median of {r['steps']}, min {r['train/step_ms_min']:.1f}, "
                f"max {r['train/step_ms_max']:.1f})"),
      ("train FLOPs", f"{r['train/model_flops_per_image'] / 1e9:.3f} GFLOP/img model "
                      f"(3 x fwd matmuls), {r['train/flops_per_image'] / 1e9:.3f} "
                      f"GFLOP/img {r['train/flops_source']}"),
      ("train rate", f"{r['train/model_tflops_per_sec'] * 1e3:.1f} model GFLOP/s, "
                     f"MFU {num(r['train/mfu'] and 100 * r['train/mfu'], '.1f')}% of "
                     f"{num(r['device/peak_tflops'] and r['device/peak_tflops'] * 1e3, '.1f')}"
                     f" GFLOP/s peak [{r['device/peak_source']}]"),
      ("eval", f"{r['eval/images_per_sec']:.1f} img/s, {r['eval/step_ms']:.1f} ms/step"),
      ("input", f"{num(r['input/images_per_sec'], '.0f')} img/s"
                + (f" ({r['input/skipped']})" if r["input/skipped"] else "")),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
