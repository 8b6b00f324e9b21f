"""FLOPs of a model and a compiled step, and the peak rate of the devices they run on.

* `forward_matmul_flops`: 2*M*N*K over every matmul and convolution of the traced forward
  pass, per image (the peers' and MFU's convention: 3x that per trained image), so it
  holds for any config or override.
* `xla_flops`: XLA's cost analysis of a compiled program (every op included).
* Peak: a table of accelerator peaks (dense bf16, or TF32 for float32 on GPUs), or on CPU
  the float32 matmul rate measured in the same process.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax.train import state as state_lib

# Dense peak TFLOP/s per device: (bfloat16, float32). float32 on NVIDIA Ampere and newer
# is the TF32 tensor-core rate (JAX's default matmul precision there); TPUs run float32
# matmuls as bf16 passes, so their bf16 figure is used for both.
PEAK_TFLOPS = (
    ("H200", (989.0, 494.0)), ("H100 PCIe", (756.0, 378.0)), ("H100 NVL", (835.0, 418.0)),
    ("H100", (989.0, 494.0)),
    ("GH200", (989.0, 494.0)), ("B200", (2250.0, 1100.0)), ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)), ("L40", (181.0, 90.5)), ("L4", (121.0, 60.0)),
    ("A10G", (70.0, 35.0)),
    ("A10", (125.0, 62.5)), ("V100", (125.0, 15.7)), ("T4", (65.0, 8.1)),
    # v2 and v3 chips are two JAX devices (one per core): their peaks are per core.
    ("TPU v2", (22.5, 22.5)), ("TPU v3", (61.5, 61.5)), ("TPU v4", (275.0, 275.0)),
    ("TPU v5 lite", (197.0, 197.0)), ("TPU v5e", (197.0, 197.0)), ("TPU v5p", (459.0, 459.0)),
    ("TPU v5", (459.0, 459.0)), ("TPU v6 lite", (918.0, 918.0)), ("TPU v6e", (918.0, 918.0)),
)


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
