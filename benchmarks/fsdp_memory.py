r"""Memory per device of the compiled train step, with and without FSDP, from XLA.

  python benchmarks/fsdp_memory.py [--models=ViT-L/16,ViT-H/14] [--batch_size=256]

Compiles (never runs) the real train step (`vit_jax.train.steps.make_train_step`, AdamW,
bfloat16 compute, scanned blocks) for abstract parameters, so even ViT-H/14 needs no
memory; prints `compiled.memory_analysis()` per device: arguments (parameters, optimiser
state and the batch), temporaries, and their sum, without and with `config.remat`. On 8
simulated CPU devices (set XLA_FLAGS yourself for another count), the figures are XLA's
CPU buffer assignment: parameters and optimiser state are exact for any backend, the
temporaries indicative.
"""
from __future__ import annotations

import argparse
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vit_jax import config as config_lib, parallel  # noqa: E402
from vit_jax.train import checkpoints, optim, state as state_lib, steps  # noqa: E402


def memory(model_name: str, fsdp: bool, remat: bool, batch_size: int) -> dict[str, float]:
  config = config_lib.get_base_config()
  config.model.name, config.image_size, config.fsdp = model_name, 224, fsdp
  config.compute_dtype, config.scan_layers, config.total_steps = "bfloat16", True, 1000
  config.batch_size, config.kernels, config.remat = batch_size, "xla", remat
  mesh = parallel.make_mesh()
  model = state_lib.build_model(config, 1000)
  shape = (224, 224, 3)
  abstract_params = jax.eval_shape(lambda: state_lib.init_params(model, 0, shape))
  tx = optim.make_optimizer(config, abstract_params)
  abstract_state = jax.eval_shape(lambda: state_lib.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32), params=abstract_params,
      opt_state=tx.init(abstract_params), rng=jax.numpy.zeros((2,), jax.numpy.uint32)))
  shardings = state_lib.state_shardings(abstract_state, mesh, fsdp)
  step = steps.make_train_step(config, model, tx, mesh, shardings, num_classes=1000,
                               mean_C=np.zeros(3, np.float32), std_C=np.ones(3, np.float32))
  batch = {"image": jax.ShapeDtypeStruct((batch_size, *shape), np.uint8,
                                         sharding=parallel.batch_sharding(mesh)),
           "label": jax.ShapeDtypeStruct((batch_size,), np.int32,
                                         sharding=parallel.batch_sharding(mesh))}
  compiled = step.lower(checkpoints.abstract_with_shardings(abstract_state, shardings),
                        batch).compile()
  analysis = compiled.memory_analysis()
  gib = 2.0**30
  arguments = analysis.argument_size_in_bytes / gib
  temporaries = analysis.temp_size_in_bytes / gib
  return {"params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
      abstract_params)), "arguments": arguments, "temporaries": temporaries,
          "total": arguments + temporaries}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="ViT-L/16,ViT-H/14")
  parser.add_argument("--batch_size", type=int, default=256)
  args = parser.parse_args()
  print(f"{jax.device_count()} devices ({jax.devices()[0].platform}), global batch "
        f"{args.batch_size}, bfloat16 compute, AdamW (float32 parameters and moments)")
  print("| model | params | FSDP | remat | arguments GiB/device | temporaries GiB/device "
        "| total |")
  print("|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    for fsdp, remat in ((False, False), (True, False), (False, True), (True, True)):
      m = memory(name, fsdp, remat, args.batch_size)
      print(f"| {name} | {m['params'] / 1e6:.0f}M | {'yes' if fsdp else 'no'} | "
            f"{'yes' if remat else 'no'} | {m['arguments']:.2f} | {m['temporaries']:.2f} | "
            f"{m['total']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
