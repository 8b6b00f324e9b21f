"""train_and_evaluate(config, workdir): the main job, resumable and multi-host.

mesh -> input -> model -> optimiser -> checkpoint/resume -> steps -> loop (log, eval,
checkpoint) -> final evaluation. Rerunning the same command in the same workdir resumes
from the newest readable checkpoint and reproduces the uninterrupted run bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from configs import common
from vit_jax import (checkpoints, config_check, data, optim, parallel, report, run_files,
                     state as state_lib, steps)


class NonFiniteLossError(RuntimeError):
  pass


class _StopSignal:
  """SIGTERM/SIGINT ask the loop to checkpoint and exit at the next step boundary."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    self.received = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _is_better(value: float, best: float | None, metric: str) -> bool:
  if best is None:
    return True
  return value < best if metric == "loss" else value > best


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; returns the final evaluation metrics."""
  # --------------------------------------------------------------------------- Mesh
  config_check.validate(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.batch_size)
  parallel.check_batch_divides(config.eval_batch_size, "config.eval_batch_size")
  os.makedirs(workdir, exist_ok=True)

  # -------------------------------------------------------------------------- Input
  train_source = data.load_source(config, config.train_split)
  eval_source = data.load_source(config, config.eval_split)
  val_source = data.load_source(config, config.val_split) if config.val_split else None
  mean_C, std_C = train_source.channel_mean_std()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.total_steps = config.total_steps or common.steps_for_epochs(
        len(train_source), config.batch_size, config.num_epochs)
  total_steps = config.total_steps
  run_files.prepare_workdir(workdir, config, class_names=train_source.class_names,
                            image_shape=train_source.image_shape, mean_C=mean_C,
                            std_C=std_C)

  # ------------------------------------------------------------------ Model + optimiser
  model = state_lib.build_model(config, train_source.num_classes)
  input_shape = (config.image_size, config.image_size, train_source.image_shape[-1])
  abstract_params = jax.eval_shape(
      lambda: state_lib.init_params(model, config.seed, input_shape))
  tx = optim.make_optimizer(config, abstract_params)
  schedule = optim.make_schedule(config)
  state, shardings = state_lib.create_state(model, tx, mesh, seed=config.seed,
                                            image_shape_HWC=input_shape, fsdp=config.fsdp)

  # -------------------------------------------------------------- Checkpoint / resume
  store = checkpoints.CheckpointStore(workdir, config.keep_checkpoints)
  restored = store.restore(checkpoints.abstract_with_shardings(state, shardings))
  writer = report.MetricsWriter(workdir)
  if restored is not None:
    state, start_step = restored.state, restored.step
    print(f"Resuming from {workdir}/checkpoints/{start_step} (step {start_step}/{total_steps}).",
          flush=True)
    writer.truncate_after(start_step)
  else:
    start_step = 0
    if config.init_from:
      from vit_jax import pretrained  # Fine-tuning only.
      state = state.replace(params=pretrained.load_into(config, state.params))
  best = store.best_meta()
  best_value = None if best is None else best["value"]

  # ------------------------------------------------------------------------- Steps
  train_step = steps.make_train_step(config, model, tx, mesh, shardings,
                                     num_classes=train_source.num_classes,
                                     mean_C=mean_C, std_C=std_C)
  eval_step = steps.make_eval_step(config, model, mesh, shardings.params,
                                   mean_C=mean_C, std_C=std_C)
  select_source = val_source or eval_source
  select_prefix = "val" if val_source is not None else "eval"

  def evaluate(params, source, prefix: str) -> dict:
    result = steps.run_eval(eval_step, params, data.eval_batches(
        source, batch_size=config.eval_batch_size, mesh=mesh))
    return {k.replace("eval/", f"{prefix}/"): v for k, v in result.items()}

  # -------------------------------------------------------------------------- Loop
  batches = data.train_iterator(train_source, batch_size=config.batch_size,
                                seed=config.seed, mesh=mesh, start_step=start_step)
  if restored is not None:
    batches.set_state(restored.data_state)  # Refuses a state from another seed/batch/data.
  progress = report.Progress(total_steps, start_step)
  stop = _StopSignal()
  pending: list[tuple[int, dict]] = []  # Device scalars since the last log.
  last_eval: dict = {}
  t_log, step = time.time(), start_step
  try:
    while step < total_steps:
      state, step_metrics = train_step(state, next(batches))
      step += 1
      pending.append((step, step_metrics))

      is_last = step == total_steps
      if step % config.log_every_steps == 0 or is_last or stop.received:
        fetched = jax.device_get([m for _, m in pending])
        bad = [s for (s, _), m in zip(pending, fetched) if not m["finite"]]
        if bad and config.on_nonfinite == "stop":
          raise NonFiniteLossError(
              f"Non-finite loss or gradient at step {bad[0]} (the update was not applied). "
              f"The last good checkpoint is in {workdir}/checkpoints. Lower config.optim.lr, "
              "set config.optim.grad_clip_norm, or set config.on_nonfinite='skip' to skip "
              "such steps.")
        elapsed = time.time() - t_log
        scalars = {
            "train/loss": float(np.mean([m["loss"] for m in fetched if m["finite"]] or [np.nan])),
            "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched if m["finite"]]
                                             or [np.nan])),
            "train/lr": float(schedule(step - 1)),
            "train/images_per_sec": len(fetched) * config.batch_size / max(elapsed, 1e-9),
        }
        if bad:
          scalars["train/skipped_steps"] = len(bad)
        writer.write(step, scalars)
        progress.update(step, scalars)
        pending, t_log = [], time.time()

      if step % config.eval_every_steps == 0 or is_last:
        last_eval = evaluate(state.params, select_source, select_prefix)
        writer.write(step, last_eval)
        progress.update(step, {k.replace(f"{select_prefix}/", "eval/"): v
                               for k, v in last_eval.items()})
        value = last_eval[f"{select_prefix}/{config.best_metric}"]
        if _is_better(value, best_value, config.best_metric):
          best_value = value
          store.save_best(step, state, batches.get_state(),
                          {"metric": f"{select_prefix}/{config.best_metric}", "value": value})
        t_log = time.time()

      if step % config.checkpoint_every_steps == 0 or is_last or stop.received:
        store.save(step, state, batches.get_state(), {})
        t_log = time.time()
      if stop.received:
        print(f"Received {stop.received}: saved checkpoint at step {step}; rerun the same "
              "command to resume.", flush=True)
        return {"preempted_at_step": step}
  finally:
    stop.restore()
    batches.close()

  # ---------------------------------------------------------------- Final evaluation
  final = dict(last_eval) or evaluate(state.params, select_source, select_prefix)
  if val_source is not None:
    best_state = store.restore(checkpoints.abstract_with_shardings(state, shardings), "best")
    final.update(evaluate(best_state.state.params, eval_source, "eval"))
    final["eval/best_step"] = best_state.step
    writer.write(step, {k: v for k, v in final.items() if k.startswith("eval/")})
  store.close()
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
      json.dump({"step": step, **final}, f, indent=2)
  progress.summary({"steps": step, **{k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in final.items()},
                    "workdir": workdir})
  return final
