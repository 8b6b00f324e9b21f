r"""Benchmark mode: the real train and eval steps on synthetic data, FLOPs and MFU.

  python main.py --mode=bench --config=configs/cifar100.py:keras
  python main.py --mode=bench --config=configs/cifar100.py --config.batch_size=128
  # the model alone, without the random augmentation:
  python main.py --mode=bench --config=configs/cifar100.py:keras \
      --config.aug.flip=False --config.aug.rotate=0 --config.aug.zoom=0

What is timed:
* train: `steps.make_train_step` exactly as `train.py` builds it (the config's
  augmentation, optimiser and sharding, state donated), on uint8 images of the dataset's
  stored shape (e.g. 32x32x3 for CIFAR-100, resized inside the step to image_size).
  `warmup_steps` untimed steps, then the median of `steps` timed steps; every step is
  synchronised by reading the loss back to the host and blocking on the new state.
* eval: `steps.make_eval_step` on the same kind of batch (eval_batch_size).
* input: `data.measure_input_throughput` on the real training split, when the dataset
  is available without downloading; otherwise null and `input/skipped` says why.
* FLOPs: `train/flops_per_image` is XLA's cost analysis of the compiled train step
  (`train/flops_source` = "xla_cost_analysis"; every op, augmentation and optimiser
  included); where XLA gives none, 3 x the forward matmul FLOPs ("formula").
  `train/model_flops_per_image` is the model-FLOPs convention of the peers and of MFU:
  3 x (2*M*N*K over every matmul and convolution of the forward pass), counted from the
  traced program, so it holds for any config or override.
* MFU = model FLOPs per second / peak. Peak: a table of accelerator peaks (dense
  bf16, or TF32 for float32 on GPUs) times the device count; on CPU the float32 matmul
  rate measured in this run (`device/peak_tflops`, `device/peak_source`).

Step counts and the peak measurement come from `config.bench` (configs/common.py).
Prints a table, then one JSON line (every key of the returned dict).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import config_check, models, optim, parallel, state as state_lib, steps

# (image shape HWC, classes) of datasets the benchmark knows without reading them.
KNOWN_DATASETS = {
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "kmnist": ((28, 28, 1), 10),
    "emnist": ((28, 28, 1), 62),
    "svhn_cropped": ((32, 32, 3), 10),
    "stl10": ((96, 96, 3), 10),
}
# Datasets of varying image size are loaded at config.load_size (0 = image_size).
KNOWN_VARIABLE_SIZE = {
    "imagenet2012": 1000, "imagenet_v2": 1000, "imagenette": 10, "oxford_iiit_pet": 37,
    "oxford_flowers102": 102, "caltech101": 102, "food101": 101, "cars196": 196,
    "dtd": 47, "eurosat": 10, "resisc45": 45, "places365_small": 365,
}

# Dense peak TFLOP/s per device: (bfloat16, float32). float32 on NVIDIA Ampere and newer
# is the TF32 tensor-core rate (JAX's default matmul precision there); TPUs run float32
# matmuls as bf16 passes, so their bf16 figure is used for both.
PEAK_TFLOPS = (
    ("H200", (989.0, 494.0)), ("H100 PCIe", (756.0, 378.0)), ("H100", (989.0, 494.0)),
    ("GH200", (989.0, 494.0)), ("B200", (2250.0, 1100.0)), ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)), ("L4", (121.0, 60.0)), ("A10G", (70.0, 35.0)),
    ("A10", (125.0, 62.5)), ("V100", (125.0, 15.7)), ("T4", (65.0, 8.1)),
    ("TPU v2", (45.0, 45.0)), ("TPU v3", (123.0, 123.0)), ("TPU v4", (275.0, 275.0)),
    ("TPU v5 lite", (197.0, 197.0)), ("TPU v5e", (197.0, 197.0)), ("TPU v5p", (459.0, 459.0)),
    ("TPU v5", (459.0, 459.0)), ("TPU v6 lite", (918.0, 918.0)), ("TPU v6e", (918.0, 918.0)),
)

# Pixel statistics of uniform random uint8 images (the synthetic data), 0..255 units.
_SYNTHETIC_MEAN, _SYNTHETIC_STD = 127.5, 73.9


# --- Dataset shape ------------------------------------------------------------------------


def dataset_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
  """(stored image shape HWC, number of classes) of config.dataset, without downloading."""
  name = config.dataset.split(":")[0].split("/")[0]
  if name in KNOWN_DATASETS:
    shape, classes = KNOWN_DATASETS[name]
    return tuple(shape), classes
  size = config.load_size or config.image_size
  if name in KNOWN_VARIABLE_SIZE:
    return (size, size, 3), KNOWN_VARIABLE_SIZE[name]
  if name == "folder":
    from vit_jax import data  # pylint: disable=g-import-not-at-top
    source = data.load_source(config, config.train_split)
    return tuple(source.image_shape), source.num_classes
  try:  # A prepared TFDS dataset: its info is on disk.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    if builder.is_prepared():
      info = builder.info
      keys = info.supervised_keys
      image_key, label_key = keys if keys and len(keys) == 2 else ("image", "label")
      shape = tuple(info.features[image_key].shape)
      if None in shape:
        shape = (size, size, shape[-1])
      return shape, info.features[label_key].num_classes
  except Exception:  # pylint: disable=broad-except
    pass
  raise config_check.ConfigError(
      f"config.dataset={config.dataset!r}: the benchmark does not know the image shape of "
      f"this dataset and it is not prepared in config.data_dir: use one of "
      f"{', '.join(sorted({**KNOWN_DATASETS, **KNOWN_VARIABLE_SIZE}))}, or prepare it "
      "first (e.g. one --mode=train run).")


# --- FLOPs -------------------------------------------------------------------------------


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval
  contract = int(np.prod([lhs.shape[d] for d in lhs_contract]))
  return 2 * int(np.prod(out.shape)) * contract


def _conv_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  dn = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval
  # rhs spec: (out feature dim, in feature dim, spatial dims...).
  rhs_in = rhs.shape[dn.rhs_spec[1]]
  window = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]]))
  return 2 * int(np.prod(out.shape)) * rhs_in * window // eqn.params["feature_group_count"]


def matmul_flops(jaxpr) -> int:
  """2*M*N*K summed over every dot_general and convolution of a (closed) jaxpr, sub-jaxprs
  (jit, scan bodies times their length, remat, custom_vjp) included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in _sub_jaxprs(eqn.params):
      total += times * matmul_flops(sub)
  return total


def _sub_jaxprs(params: dict):
  """The jaxprs among an equation's parameters (jit, scan, cond branches, remat...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "eqns") or hasattr(getattr(item, "jaxpr", None), "eqns"):
        yield item


def forward_matmul_flops(model: models.VisionTransformer, image_shape_HWC: tuple[int, ...],
                         batch: int = 1) -> float:
  """Forward matmul FLOPs per image (the `vit_flops.py` convention) of `model`."""
  x = jax.ShapeDtypeStruct((batch, *image_shape_HWC), jnp.float32)
  params = jax.eval_shape(lambda: state_lib.init_params(model, 0, image_shape_HWC))
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, train=False))(params, x)
  return matmul_flops(jaxpr) / batch


def xla_flops(compiled) -> float | None:
  """XLA's cost-analysis FLOPs of a compiled program (None where unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# --- Peak rate ---------------------------------------------------------------------------


def table_peak_tflops(device_kind: str, dtype: str) -> float | None:
  for name, (bf16, f32) in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return f32 if jnp.dtype(dtype) == jnp.float32 else bf16
  return None


def measure_matmul_tflops(n: int, reps: int) -> float:
  """float32 n^3 matmul rate of the default device (median of `reps` after 2 warm-ups)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  for _ in range(2):
    f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e12


# --- Timing ------------------------------------------------------------------------------


def _time_calls(call: Callable[[int], Any], warmup: int, n: int) -> list[float]:
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
    from vit_jax import data  # pylint: disable=g-import-not-at-top
    if config.dataset != "folder":
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder(config.dataset, data_dir=config.data_dir)
      if not builder.is_prepared() and not config.manual_dir:
        return None, (f"{config.dataset} is not prepared in {builder.data_dir_root} and no "
                      "config.manual_dir is set (the benchmark does not download)")
    return data.measure_input_throughput(config, mesh, num_batches=num_batches), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"[:300]


# --- The benchmark -----------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, *, verbose: bool = True) -> dict:
  """Times the config's train and eval steps; prints a table and one JSON line."""
  opts = config.bench
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.batch_size)
  parallel.check_batch_divides(config.eval_batch_size, "config.eval_batch_size")
  shape_HWC, num_classes = dataset_shape(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    # The schedule needs a length; its value does not change the cost of a step.
    config.total_steps = config.total_steps or 10_000
  mean_C = np.full((shape_HWC[-1],), _SYNTHETIC_MEAN, np.float32)
  std_C = np.full((shape_HWC[-1],), _SYNTHETIC_STD, np.float32)
  batch_size = config.batch_size
  devices = jax.devices()
  platform, device_kind = devices[0].platform, devices[0].device_kind

  # ---------------------------------------------------------------- Model and steps
  model = state_lib.build_model(config, num_classes)
  input_shape = (config.image_size, config.image_size, shape_HWC[-1])
  abstract_params = jax.eval_shape(lambda: state_lib.init_params(model, config.seed,
                                                                 input_shape))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params))
  tx = optim.make_optimizer(config, abstract_params)
  state, shardings = state_lib.create_state(model, tx, mesh, seed=config.seed,
                                            image_shape_HWC=input_shape, fsdp=config.fsdp)
  train_step = steps.make_train_step(config, model, tx, mesh, shardings,
                                     num_classes=num_classes, mean_C=mean_C, std_C=std_C)
  eval_step = steps.make_eval_step(config, model, mesh, shardings.params,
                                   mean_C=mean_C, std_C=std_C)
  train_batches = _synthetic_batches(shape_HWC, num_classes, batch_size, mesh, 2, seed=0)
  eval_batches = _synthetic_batches(shape_HWC, num_classes, config.eval_batch_size, mesh, 2,
                                    seed=1, mask=True)

  t0 = time.perf_counter()
  train_compiled = train_step.lower(state, train_batches[0]).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  eval_compiled = eval_step.lower(state.params, eval_batches[0]).compile()
  eval_compile_s = time.perf_counter() - t0

  # -------------------------------------------------------------------------- Train
  holder = {"state": state}
  losses = []

  def train_call(i: int) -> None:
    new_state, m = train_compiled(holder["state"], train_batches[i % len(train_batches)])
    losses.append(float(m["loss"]))  # Reads the loss back, as the peers do.
    holder["state"] = jax.block_until_ready(new_state)

  train_times = _time_calls(train_call, opts.warmup_steps, opts.steps)
  params = holder["state"].params

  def eval_call(i: int) -> None:
    jax.block_until_ready(eval_compiled(params, eval_batches[i % len(eval_batches)]))

  eval_times = _time_calls(eval_call, 1, opts.eval_steps)

  # --------------------------------------------------------------- FLOPs and peak
  fwd_flops = forward_matmul_flops(model, input_shape)
  model_flops = 3 * fwd_flops
  counted = xla_flops(train_compiled)
  if counted is not None:
    # The compiled program is one device's share of the SPMD step.
    flops_per_image = counted * len(devices) / batch_size
    flops_source = "xla_cost_analysis"
  else:
    flops_per_image, flops_source = model_flops, "formula"
  table_peak = table_peak_tflops(device_kind, config.compute_dtype)
  if table_peak is not None:
    peak, peak_source = table_peak * len(devices), f"table ({device_kind} x {len(devices)})"
  elif platform == "cpu" and opts.matmul_size > 0:
    # Simulated CPU devices share the host's cores: the host's rate is the peak.
    peak = measure_matmul_tflops(opts.matmul_size, opts.matmul_reps)
    peak_source = f"measured f32 matmul {opts.matmul_size}^3 (jax.jit, median)"
  else:
    peak, peak_source = None, f"unknown device kind {device_kind!r}"

  input_ips, input_why = _input_throughput(config, mesh, opts.input_batches)

  step_s = statistics.median(train_times)
  eval_s = statistics.median(eval_times)
  images_per_sec = batch_size / step_s
  model_tflops = images_per_sec * model_flops / 1e12
  result = {
      "model": config.model.name,
      "params": num_params,
      "dataset": config.dataset,
      "input_shape": list(shape_HWC),
      "image_size": config.image_size,
      "num_classes": num_classes,
      "batch_size": batch_size,
      "eval_batch_size": config.eval_batch_size,
      "dtype": config.compute_dtype,
      "devices": len(devices),
      "platform": platform,
      "device_kind": device_kind,
      "jax_version": jax.__version__,
      "compile_s": compile_s,
      "eval/compile_s": eval_compile_s,
      "warmup_steps": opts.warmup_steps,
      "steps": opts.steps,
      "train/images_per_sec": images_per_sec,
      "train/step_ms": 1e3 * step_s,
      "train/step_ms_min": 1e3 * min(train_times),
      "train/step_ms_max": 1e3 * max(train_times),
      "train/flops_per_image": flops_per_image,
      "train/flops_source": flops_source,
      "train/model_flops_per_image": model_flops,
      "train/tflops_per_sec": images_per_sec * flops_per_image / 1e12,
      "train/model_tflops_per_sec": model_tflops,
      "train/mfu": model_tflops / peak if peak else None,
      "train/final_loss": losses[-1],
      "device/peak_tflops": peak,
      "device/peak_source": peak_source,
      "eval/images_per_sec": config.eval_batch_size / eval_s,
      "eval/step_ms": 1e3 * eval_s,
      "input/images_per_sec": input_ips,
      "input/skipped": input_why,
  }
  if verbose and jax.process_index() == 0:
    print(format_table(result, config), flush=True)
    print(json.dumps(result), flush=True)
  return result


def format_table(r: dict, config: ml_collections.ConfigDict) -> str:
  def num(v, fmt):
    return "n/a" if v is None else format(v, fmt)

  aug = {k: v for k, v in config.aug.to_dict().items()
         if k in ("crop", "flip", "rotate", "zoom", "randaugment_layers", "mixup_alpha",
                  "cutmix_alpha", "random_erasing") and v not in (0, 0.0, False, "none")}
  rows = [
      ("model", f"{r['model']} ({r['params']:,} params), {r['dtype']}"),
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
