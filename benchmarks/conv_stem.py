r"""The convolutional stem (`stem_features`) two ways: XLA's convolutions against ours.

  python benchmarks/conv_stem.py [--batch=256 --image-size=28 --channels=1 --patch=7 \
      --features=8 --width=128 --reps=30]

Times one jitted step of the stem and the patch embedding (forward, then the gradient
of a squared-sum loss with respect to their parameters) on random images:
  xla_conv  a 3x3 SAME convolution + bias, tanh GELU, then a P x P stride-P convolution
            (how a stem is usually written: nn.Conv twice);
  vit_jax   layers.ConvStem (3x3 neighbourhoods gathered in patch order, one matmul,
            GELU) and the Dense patch embedding, what VisionTransformer runs.
Both use the same parameters; the script prints the median ms per step of each, their
ratio, and the largest difference between their outputs (float rounding).
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers
from vit_jax.tools import bench

_DN = ("NHWC", "HWIO", "NHWC")


def run(batch: int, image_size: int, channels: int, patch: int, features: int, width: int,
        reps: int) -> dict:
  images = jax.random.normal(jax.random.key(0), (batch, image_size, image_size, channels))
  stem = layers.ConvStem(features, patch, gelu_approximate=True, dtype=jnp.float32, cpu=True)
  params = {"stem": stem.init(jax.random.key(1), images[:1])["params"],
            "embedding": jax.random.normal(jax.random.key(2),
                                           (patch * patch * features, width)) * 0.05}

  def ours(p, x):
    return stem.apply({"params": p["stem"]}, x) @ p["embedding"]

  def xla_conv(p, x):
    y = jax.lax.conv_general_dilated(x, p["stem"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=_DN) + p["stem"]["bias"]
    y = jax.nn.gelu(y, approximate=True)
    y = jax.lax.conv_general_dilated(y, p["embedding"].reshape(patch, patch, features, width),
                                     (patch, patch), "VALID", dimension_numbers=_DN)
    return y.reshape(batch, -1, width)

  result = {}
  for name, forward in (("xla_conv", xla_conv), ("vit_jax", ours)):
    step = jax.jit(jax.value_and_grad(lambda p, x, f=forward: jnp.sum(f(p, x) ** 2)))
    times = bench.time_calls(lambda _, s=step: jax.block_until_ready(s(params, images)),
                             warmup=1, n=reps)  # The warm-up call compiles.
    result[f"{name}_ms"] = float(np.median(times) * 1e3)
  result["speedup"] = result["xla_conv_ms"] / result["vit_jax_ms"]
  result["max_abs_diff"] = float(jnp.abs(ours(params, images) - xla_conv(params, images)).max())
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for flag, default in (("batch", 256), ("image-size", 28), ("channels", 1), ("patch", 7),
                        ("features", 8), ("width", 128), ("reps", 30)):
    parser.add_argument(f"--{flag}", type=int, default=default)
  args = parser.parse_args()
  result = run(args.batch, args.image_size, args.channels, args.patch, args.features,
               args.width, args.reps)
  print(f"{'xla_conv':>10} {result['xla_conv_ms']:8.2f} ms\n{'vit_jax':>10} "
        f"{result['vit_jax_ms']:8.2f} ms\n{'speedup':>10} {result['speedup']:8.2f}x   "
        f"(outputs differ by at most {result['max_abs_diff']:.1e})")
  print(json.dumps({**vars(args), **result}))


if __name__ == "__main__":
  main()
