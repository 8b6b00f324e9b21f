"""train_and_evaluate(config, workdir): the main job, resumable and multi-host.

mesh -> input -> model + optimiser -> resume -> steps -> loop (log, evaluate + best,
checkpoint, preemption) -> final evaluation. Rerunning the same command in the same
workdir resumes from the newest readable checkpoint and reproduces the uninterrupted run
bit for bit (parameters and metrics.jsonl, but for the measured images/sec).

Faults:
- SIGTERM or SIGINT: a checkpoint at the next step, then `preemption.Preempted` (exit
  status 143 or 130; see preemption.py).
- A non-finite loss or gradient: the update is never applied (see steps.py). With
  `config.on_nonfinite="stop"` the run raises `errors.NonFiniteLossError` naming the step
  before it saves anything past it; with "skip" it goes on and logs `train/skipped_steps`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vit_jax import config as config_lib, data, errors, parallel, paths
from vit_jax.data import pipeline
from vit_jax.train import (checkpoints, optim, preemption, pretrained, report,
                           state as state_lib, steps, workdir as workdir_lib)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints into `workdir`; resumes the run found there.

  Args:
    config: a config from `vit_jax.config.get_base_config()` (a recipe in configs/).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events and pictures go.

  Returns:
    The final evaluation metrics ("eval/top1", "eval/top5", "eval/loss", ...).

  Raises:
    preemption.Preempted (a SystemExit) after checkpointing on SIGTERM/SIGINT;
    errors.NonFiniteLossError at a non-finite step when config.on_nonfinite="stop";
    other errors.UserError kinds for config, data and workdir mistakes.
  """
  # --------------------------------------------------------------------------- Mesh
  config_lib.validate(config)
  workdir_lib.check_folder(workdir)
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.batch_size)
  parallel.check_batch_divides(config.eval_batch_size, "config.eval_batch_size")
  workdir_lib.check_shared(workdir)

  # -------------------------------------------------------------------------- Input
  train_source = data.load_source(config, config.train_split)
  eval_source = data.load_source(config, config.eval_split)
  val_source = data.load_source(config, config.val_split) if config.val_split else None
  num_classes = train_source.num_classes
  mean_C, std_C = data.normalization_stats(config, train_source)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config_lib.resolve_steps(config, len(train_source))
  workdir_lib.check_workdir(workdir, config, num_classes)

  # -------------------------------------------------------------- Model + optimiser
  model = state_lib.build_model(config, num_classes)
  input_shape = (config.image_size, config.image_size, train_source.image_shape[-1])
  abstract_params = jax.eval_shape(
      lambda: state_lib.init_params(model, config.seed, input_shape))
  tx = optim.make_optimizer(config, abstract_params)
  state, shardings = state_lib.create_state(model, tx, mesh, seed=config.seed,
                                            image_shape_HWC=input_shape, fsdp=config.fsdp,
                                            ema=config.ema_decay > 0)

  # ------------------------------------------------------------------ Resume or start
  store, restored, batches, state = _resume_or_start(config, workdir, state, shardings,
                                                     train_source, mesh)
  # The first write into the workdir: the run is known to start.
  paths.makedirs(workdir)
  workdir_lib.write_run_files(workdir, config, class_names=train_source.class_names,
                              image_shape=train_source.image_shape, mean_C=mean_C,
                              std_C=std_C, host_crops=train_source.host_crops)
  writer = report.MetricsWriter(workdir)
  start_step = _resume(config, workdir, restored, store, writer)

  # -------------------------------------------------------------------------- Steps
  on_device = data.for_device(config, train_source.host_crops)  # Photos are cropped on the host.
  train_step = steps.make_train_step(on_device, model, tx, mesh, shardings,
                                     num_classes=num_classes, mean_C=mean_C, std_C=std_C)
  evaluate = _evaluator(steps.make_eval_step(on_device, model, mesh, shardings.params,
                                             mean_C=mean_C, std_C=std_C),
                        config.eval_batch_size, mesh, config.input.worker_count)

  # --------------------------------------------------------------------------- Loop
  unlogged = list(restored.meta.get("unlogged", [])) if restored is not None else []
  run = _Run(config, workdir, store, writer, evaluate, metrics=_StepMetrics(unlogged),
             select=(val_source or eval_source, "val" if val_source is not None else "eval"),
             last_saved=start_step if restored is not None else None)
  try:
    state, step = _loop(run, state, train_step, batches, start_step)
  except BaseException:
    store.close()
    writer.close()
    raise
  finally:
    batches.close()

  # --------------------------------------------------------------- Final evaluation
  return _final_evaluation(run, state, shardings, step, eval_source, val_source)


# --- The loop's phases --------------------------------------------------------------------


@dataclasses.dataclass
class _StepMetrics:
  """Per-step training metrics: on the device until a log, evaluation or checkpoint needs
  them, then on the host in `unlogged` ({"step", "loss", "grad_norm", "finite"}) until the
  next metrics.jsonl row. `unlogged` is saved with each checkpoint, so that a resumed run
  writes the rows an uninterrupted one would."""
  unlogged: list[dict]
  on_device: list[tuple[int, dict]] = dataclasses.field(default_factory=list)
  since: float = dataclasses.field(default_factory=time.time)  # Start of the timed stretch.
  paused: float = 0.0  # Seconds of the stretch spent evaluating and checkpointing.

  def fetch(self) -> list[int]:
    """Moves the device metrics to `unlogged`; returns the non-finite steps among them."""
    if self.on_device:
      fetched = jax.device_get([m for _, m in self.on_device])
      for (step, _), m in zip(self.on_device, fetched):
        finite = bool(m["finite"])
        self.unlogged.append({"step": step, "finite": finite,
                              "loss": float(m["loss"]) if finite else None,
                              "grad_norm": float(m["grad_norm"]) if finite else None})
      self.on_device = []
    return [u["step"] for u in self.unlogged if not u["finite"]]

  def row(self, step: int, lr: float, batch_size: int) -> dict[str, float]:
    """The metrics.jsonl row of the steps since the last one; starts the next."""
    finite = [u for u in self.unlogged if u["finite"]]
    scalars = {
        "train/loss": _mean([u["loss"] for u in finite]),
        "train/grad_norm": _mean([u["grad_norm"] for u in finite]),
        "train/lr": lr,
        "train/images_per_sec": (len(self.unlogged) * batch_size
                                 / max(time.time() - self.since - self.paused, 1e-9)),
    }
    skipped = [u["step"] for u in self.unlogged if not u["finite"]]
    if skipped:
      scalars["train/skipped_steps"] = len(skipped)
      listed = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
      print(f"WARNING: skipped {len(skipped)} step(s) with a non-finite loss or gradient "
            f"(steps {listed}).", flush=True)
    self.unlogged = []
    self.since, self.paused = time.time(), 0.0
    return scalars

  @contextlib.contextmanager
  def untimed(self):
    """Leaves what runs inside (an evaluation, a checkpoint) out of the images/s, also when
    it falls between two rows: the steps before it keep their time."""
    start = time.time()
    try:
      yield
    finally:
      self.paused += time.time() - start


@dataclasses.dataclass
class _Run:
  """What the loop's phases share."""
  config: ml_collections.ConfigDict
  workdir: str
  store: checkpoints.CheckpointStore
  writer: report.MetricsWriter
  evaluate: Callable[[Any, data.Source, str], dict]
  select: tuple[data.Source, str]  # The split that picks the best checkpoint, its prefix.
  metrics: _StepMetrics
  last_saved: int | None  # The newest checkpoint's step.
  last_eval: dict = dataclasses.field(default_factory=dict)


def _resume_or_start(config, workdir: str, state, shardings, train_source: data.Source,
                     mesh) -> tuple[checkpoints.CheckpointStore, checkpoints.Restored | None,
                                    pipeline.TrainIterator, Any]:
  """(store, restored, training batches, state): the run in the workdir, or a new one with
  its parameters from config.init_from.

  Everything that can refuse the run (a checkpoint of another train state, the data state
  of another run, a config.init_from that cannot be read) happens here, before anything is
  written: a failed start leaves the workdir as it was.
  """
  store = checkpoints.CheckpointStore(workdir, config.keep_checkpoints)
  try:
    restored = _restore(store, state, shardings, workdir, config)
    batches = pipeline.train_iterator(train_source, batch_size=config.batch_size,
                                      seed=config.seed, mesh=mesh,
                                      start_step=restored.step if restored is not None else 0,
                                      worker_count=config.input.worker_count)
    if restored is not None:
      batches.set_state(restored.data_state)  # Refuses a state of another seed/batch/data.
      state = restored.state
    elif config.init_from:  # Read for a new run only: a resumed one has its own parameters.
      params = pretrained.load_into(config, state.params)
      state = state.replace(params=params, ema_params=(
          None if state.ema_params is None else state_lib.ema_of(params)))
  except BaseException:
    # Orbax's threads are stopped before the interpreter exits with the error: left
    # running, one of them prints a traceback after the one-line message.
    store.close()
    raise
  return store, restored, batches, state


def _resume(config, workdir: str, restored: checkpoints.Restored | None,
            store: checkpoints.CheckpointStore, writer: report.MetricsWriter) -> int:
  """The first step: 0 for a new run; a resumed run says so and drops what its crashed
  predecessor logged or kept past its checkpoint (recomputed from here)."""
  if restored is None:
    return 0
  print(f"Resuming from {workdir}/checkpoints/{restored.step} (step {restored.step}/"
        f"{config.total_steps}).", flush=True)
  writer.truncate_after(restored.step, final_key=_FINAL_KEY)
  store.discard_best_after(restored.step)
  return restored.step


def _evaluator(eval_step, batch_size: int, mesh,
               worker_count: int) -> Callable[[Any, data.Source, str], dict]:
  """(params, source, prefix) -> the metrics of every example of source, as prefix/..."""

  def evaluate(params, source: data.Source, prefix: str) -> dict:
    result = steps.run_eval(eval_step, params, pipeline.eval_batches(
        source, batch_size=batch_size, mesh=mesh, worker_count=worker_count))
    return {k.replace("eval/", f"{prefix}/"): v for k, v in result.items()}

  return evaluate


def _restore(store, state, shardings, workdir: str, config) -> checkpoints.Restored | None:
  """The newest readable checkpoint of the workdir (None for a new run)."""
  try:
    return store.restore(checkpoints.abstract_with_shardings(state, shardings))
  except errors.StateMismatchError as e:
    raise errors.StateMismatchError(
        f"{e} {workdir_lib.changed_settings(workdir, config)}") from None


def _loop(run: _Run, state, train_step, batches, step: int):
  """Steps until config.total_steps with the periodic log, evaluation and checkpoint."""
  config = run.config
  schedule = optim.make_schedule(config)
  progress = report.Progress(config.total_steps, step)
  stop = preemption.StopSignal()
  best = run.store.best_meta()
  best_value = None if best is None else best["value"]
  limit = parallel.DispatchLimit()  # Metrics are fetched only every log_every_steps.
  try:
    while step < config.total_steps:
      state, step_metrics = train_step(state, next(batches))
      step += 1
      run.metrics.on_device.append((step, step_metrics))
      limit.add(step_metrics)
      is_last = step == config.total_steps
      stopping = not is_last and stop.should_stop(step)
      if step % config.log_every_steps == 0 or is_last:
        _check_finite(run)
        scalars = run.metrics.row(step, float(schedule(step - 1)), config.batch_size)
        run.writer.write(step, scalars)
        progress.update(step, scalars)
      if step % config.eval_every_steps == 0 or is_last:
        _check_finite(run)  # Waits for the steps so far: their time stays timed.
        with run.metrics.untimed():
          best_value = _evaluate_and_keep_best(run, state, step, batches, best_value,
                                               progress)
      if step % config.checkpoint_every_steps == 0 or is_last or stopping:
        _check_finite(run)
        with run.metrics.untimed():
          run.store.save(step, state, batches.get_state(), {"unlogged": run.metrics.unlogged})
        run.last_saved = step
      if stopping:
        raise _preempted(run, stop.received, step)
  finally:
    stop.restore()
  return state, step


def _check_finite(run: _Run) -> None:
  """Fetches the step metrics; stops at a non-finite step if config.on_nonfinite="stop".

  Runs before anything is logged or saved, so that no checkpoint, best or otherwise, is
  ever written past a non-finite step that should have stopped the run.
  """
  bad = run.metrics.fetch()
  if bad and run.config.on_nonfinite == "stop":
    kept = (f"The newest checkpoint is {run.workdir}/checkpoints/{run.last_saved} (step "
            f"{run.last_saved}); a rerun resumes from it." if run.last_saved is not None
            else "No checkpoint had been saved yet.")
    raise errors.NonFiniteLossError(
        f"Non-finite loss or gradient at step {bad[0]}: its update was not applied and "
        f"the run stopped (config.on_nonfinite='stop'). {kept} "
        f"{nonfinite_advice(run.config)}")


def nonfinite_advice(config: ml_collections.ConfigDict) -> str:
  """What a rerun may change after a non-finite step: only what keeps the train state's
  structure (clipping is an optimiser stage of its own: turning it on needs a new run)."""
  skip = "or set config.on_nonfinite='skip' to skip such steps."
  if config.optim.grad_clip_norm > 0:
    return f"Lower config.optim.lr or config.optim.grad_clip_norm and rerun, {skip}"
  return (f"Lower config.optim.lr and rerun, {skip} Gradient clipping "
          "(config.optim.grad_clip_norm) changes the optimiser state: to turn it on, start "
          "over (--start_over) or use another --workdir.")


def _evaluate_and_keep_best(run: _Run, state, step: int, batches, best_value: float | None,
                            progress: report.Progress) -> float | None:
  """Evaluates the selection split, logs it, saves a best checkpoint when it improved."""
  source, prefix = run.select
  run.last_eval = _score(run, state, source, prefix)
  run.writer.write(step, run.last_eval)
  if run.writer.enabled:  # Refreshed at every evaluation: workdir/pictures/.
    report.plot_training_curves(run.workdir)
  progress.update(step, {k.replace(f"{prefix}/", "eval/"): v
                         for k, v in run.last_eval.items()})
  metric = run.config.best_metric
  value = run.last_eval[f"{prefix}/{metric}"]
  if best_value is None or (value < best_value if metric == "loss" else value > best_value):
    run.store.save_best(step, state, batches.get_state(),
                        {"metric": f"{prefix}/{metric}", "value": value})
    return value
  return best_value


def _score(run: _Run, state, source, prefix: str) -> dict:
  """prefix/* for the weights the run delivers; with EMA on, those are the EMA weights
  and the raw ones are reported as prefix_raw/*.

  The EMA gets the plain names because it is the model that eval, predict, export and a
  fine-tuning `init_from` read from the workdir: the best checkpoint is picked by it
  (config.best_metric of prefix/*), and final_metrics.json and the summary lead with it.
  """
  if state.ema_params is None:
    return run.evaluate(state.params, source, prefix)
  return {**run.evaluate(state.ema_params, source, prefix),
          **run.evaluate(state.params, source, f"{prefix}_raw")}


def _preempted(run: _Run, signal_name: str, step: int) -> preemption.Preempted:
  error = preemption.Preempted(signal_name, step)
  print(f"{signal_name}: saved a checkpoint at step {step}/{run.config.total_steps} in "
        f"{run.workdir}/checkpoints; exiting with status {error.code}. Rerun the same "
        "command to resume.", flush=True)
  return error


# The key of the final evaluation's metrics row (with a validation split).
_FINAL_KEY = "eval/best_step"


def _final_evaluation(run: _Run, state, shardings, step: int, eval_source, val_source) -> dict:
  """The last evaluation; with a validation split, the test split scored with the best
  checkpoint (picked on validation). Writes final_metrics.json, the curves, a summary."""
  source, prefix = run.select
  final = dict(run.last_eval) or _score(run, state, source, prefix)
  if val_source is not None:
    best = run.store.restore(checkpoints.abstract_with_shardings(state, shardings), "best")
    best = best or checkpoints.Restored(step, state, {}, {})
    final.update(_score(run, best.state, eval_source, "eval"))
    final[_FINAL_KEY] = best.step
    run.writer.write(step, {k: v for k, v in final.items() if k.startswith("eval")})
  run.store.close()
  run.writer.close()
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.join(run.workdir, "final_metrics.json"),
                            json.dumps({"step": step, **final}, indent=2))
    report.plot_training_curves(run.workdir)
  report.print_summary({"steps": step, **{k: round(v, 4) if isinstance(v, float) else v
                                          for k, v in final.items()}, "workdir": run.workdir})
  return final


def _mean(values: list) -> float:
  # float32 as the device computed them, averaged the same way in every run.
  return float(np.mean(np.asarray(values, np.float32))) if values else float("nan")
