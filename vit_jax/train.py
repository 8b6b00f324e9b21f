"""train_and_evaluate(config, workdir): the main job, resumable and multi-host.

mesh -> input -> model -> optimiser -> checkpoint/resume -> steps -> loop (log, eval,
checkpoint) -> final evaluation. Rerunning the same command in the same workdir resumes
from the newest readable checkpoint and reproduces the uninterrupted run bit for bit
(parameters and metrics.jsonl, but for the measured images/sec).

Faults:
- SIGTERM or SIGINT (preemption, Ctrl-C, `kill`): the step under way finishes, a
  checkpoint is saved and `Preempted` is raised: a SystemExit with status 128 + the
  signal number (143 for SIGTERM, 130 for SIGINT), as if the signal had ended the
  process, so that schedulers and shell scripts see an unfinished job and restart it
  (exit 0 would tell a Kubernetes Job or a `train && export` chain it was done). A
  second signal stops at once (the checkpoints already saved are kept). Multi-host runs
  leave SIGTERM to JAX's preemption service, which picks one step for all processes.
- A non-finite loss or gradient: the update is never applied (see steps.py). With
  `config.on_nonfinite="stop"` the run raises `NonFiniteLossError` naming the step
  before it saves anything past it; with "skip" it goes on and logs
  `train/skipped_steps`.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np

from configs import common
from vit_jax import (checkpoints, config_check, data, errors, optim, parallel, report,
                     run_files, state as state_lib, steps, visualize)


class NonFiniteLossError(errors.UserError, RuntimeError):
  pass


class Preempted(SystemExit):
  """Raised after the checkpoint that a SIGTERM/SIGINT asked for; exit status 128 + signum."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(128 + int(signal.Signals[signal_name]))
    self.signal_name, self.step = signal_name, step


class _StopSignal:
  """SIGTERM/SIGINT ask the loop to checkpoint and exit at the next step boundary.

  In a multi-host run every process must stop at the same step, so SIGTERM is left to
  JAX's preemption service (which catches it and agrees on a step) and SIGINT keeps its
  default (KeyboardInterrupt: the run resumes from its last regular checkpoint).
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    self._multihost = jax.process_count() > 1
    # Handlers can only be set from the main thread; elsewhere signals act by default.
    if not self._multihost and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    # Nothing printed here: a handler that writes to a stream the loop is writing to
    # raises "reentrant call".
    if self.received is not None:  # The second signal: stop now, the default way.
      self.restore()
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    if self._multihost:
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = "SIGTERM"
      except RuntimeError:  # The preemption service is off: signals act by default.
        pass
    return self.received is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous = {}


def _is_better(value: float, best: float | None, metric: str) -> bool:
  if best is None:
    return True
  return value < best if metric == "loss" else value > best


def _mean(values: list) -> float:
  # float32 as the device computed them, averaged the same way in every run.
  return float(np.mean(np.asarray(values, np.float32))) if values else float("nan")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; returns the final evaluation metrics.

  Raises `Preempted` (a SystemExit) after checkpointing on SIGTERM/SIGINT, and
  `NonFiniteLossError` at a non-finite step when config.on_nonfinite="stop".
  """
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
    common.resolve_steps(config, len(train_source))
  total_steps = config.total_steps
  run_files.check_workdir(workdir, config, train_source.num_classes)

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
  try:
    restored = store.restore(checkpoints.abstract_with_shardings(state, shardings))
  except checkpoints.StateMismatchError as e:
    raise checkpoints.StateMismatchError(
        f"{e} {run_files.changed_settings(workdir, config)}") from None
  # Written once the run's checkpoints are known to fit this config: a refused rerun
  # leaves the workdir's record of its run as it was.
  run_files.write_run_files(workdir, config, class_names=train_source.class_names,
                            image_shape=train_source.image_shape, mean_C=mean_C, std_C=std_C)
  writer = report.MetricsWriter(workdir)
  # Per-step training metrics since the last metrics.jsonl row, on the host:
  # {"step", "loss", "grad_norm", "finite"}. Saved with each checkpoint, so that a
  # resumed run writes the rows an uninterrupted one would.
  unlogged: list[dict] = []
  if restored is not None:
    state, start_step = restored.state, restored.step
    unlogged = list(restored.meta.get("unlogged", []))
    print(f"Resuming from {workdir}/checkpoints/{start_step} (step {start_step}/{total_steps}).",
          flush=True)
    writer.truncate_after(start_step)
    store.discard_best_after(start_step)
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
  on_device: list[tuple[int, dict]] = []  # Step metrics not yet fetched.
  last_saved = start_step if restored is not None else None
  last_eval: dict = {}
  t_log, step = time.time(), start_step

  def fetch_and_check() -> None:
    """Moves the device metrics to `unlogged`; stops at a non-finite step if asked to.

    Runs before anything is logged or saved, so that no checkpoint, best or otherwise,
    is ever written past a non-finite step that should have stopped the run.
    """
    nonlocal on_device
    if on_device:
      for (s, _), m in zip(on_device, jax.device_get([m for _, m in on_device])):
        finite = bool(m["finite"])
        unlogged.append({"step": s, "finite": finite,
                         "loss": float(m["loss"]) if finite else None,
                         "grad_norm": float(m["grad_norm"]) if finite else None})
      on_device = []
    bad = [u["step"] for u in unlogged if not u["finite"]]
    if bad and config.on_nonfinite == "stop":
      kept = (f"The newest checkpoint is {workdir}/checkpoints/{last_saved} (step "
              f"{last_saved}); a rerun resumes from it." if last_saved is not None else
              "No checkpoint had been saved yet.")
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {bad[0]}: its update was not applied and "
          f"the run stopped (config.on_nonfinite='stop'). {kept} Lower config.optim.lr or "
          "set config.optim.grad_clip_norm and rerun, or set config.on_nonfinite='skip' "
          "to skip such steps.")

  completed = False
  try:
    while step < total_steps:
      state, step_metrics = train_step(state, next(batches))
      step += 1
      on_device.append((step, step_metrics))

      is_last = step == total_steps
      stopping = not is_last and stop.should_stop(step)
      if step % config.log_every_steps == 0 or is_last:
        fetch_and_check()
        finite = [u for u in unlogged if u["finite"]]
        elapsed = time.time() - t_log
        scalars = {
            "train/loss": _mean([u["loss"] for u in finite]),
            "train/grad_norm": _mean([u["grad_norm"] for u in finite]),
            "train/lr": float(schedule(step - 1)),
            "train/images_per_sec": len(unlogged) * config.batch_size / max(elapsed, 1e-9),
        }
        skipped = [u["step"] for u in unlogged if not u["finite"]]
        if skipped:
          scalars["train/skipped_steps"] = len(skipped)
          listed = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
          print(f"WARNING: skipped {len(skipped)} step(s) with a non-finite loss or gradient "
                f"(steps {listed}).", flush=True)
        writer.write(step, scalars)
        progress.update(step, scalars)
        unlogged, t_log = [], time.time()

      if step % config.eval_every_steps == 0 or is_last:
        fetch_and_check()
        last_eval = evaluate(state.params, select_source, select_prefix)
        writer.write(step, last_eval)
        if writer.enabled:  # Refreshed at every evaluation: workdir/pictures/.
          visualize.plot_training_curves(workdir)
        progress.update(step, {k.replace(f"{select_prefix}/", "eval/"): v
                               for k, v in last_eval.items()})
        value = last_eval[f"{select_prefix}/{config.best_metric}"]
        if _is_better(value, best_value, config.best_metric):
          best_value = value
          store.save_best(step, state, batches.get_state(),
                          {"metric": f"{select_prefix}/{config.best_metric}", "value": value})
        t_log = time.time()

      if step % config.checkpoint_every_steps == 0 or is_last or stopping:
        fetch_and_check()
        store.save(step, state, batches.get_state(), {"unlogged": unlogged})
        last_saved = step
        t_log = time.time()
      if stopping:
        error = Preempted(stop.received, step)
        print(f"{stop.received}: saved a checkpoint at step {step}/{total_steps} in "
              f"{workdir}/checkpoints; exiting with status {error.code}. Rerun the same "
              "command to resume.", flush=True)
        raise error
    completed = True
  finally:
    stop.restore()
    batches.close()
    if not completed:  # Preempted or failed; the normal path closes them below.
      store.close()
      writer.close()

  # ---------------------------------------------------------------- Final evaluation
  final = dict(last_eval) or evaluate(state.params, select_source, select_prefix)
  if val_source is not None:
    best_state = store.restore(checkpoints.abstract_with_shardings(state, shardings), "best")
    best_state = best_state or checkpoints.Restored(step, state, {}, {})
    final.update(evaluate(best_state.state.params, eval_source, "eval"))
    final["eval/best_step"] = best_state.step
    writer.write(step, {k: v for k, v in final.items() if k.startswith("eval/")})
  store.close()
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
      json.dump({"step": step, **final}, f, indent=2)
    visualize.plot_training_curves(workdir)
  progress.summary({"steps": step, **{k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in final.items()}, "workdir": workdir})
  return final
