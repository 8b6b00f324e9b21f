"""Deterministic, resumable training batches and exact evaluation batches over a Source.

The same code feeds one CPU, GPUs or a TPU pod: every batch is a global `jax.Array`
split along the mesh's "data" axis, and each process reads only its own rows.

  train_iterator(source, *, batch_size, seed, mesh, start_step=0, shuffle=True,
                 worker_count=0)
      -> TrainIterator: endless dict(image, label) batches; `get_state()` / `set_state()`
      save and restore the position (the step) so a resumed run sees the same batches.
  eval_batches(source, *, batch_size, mesh, worker_count=0) -> EvalBatches: re-iterable;
      every example once, the last batch padded with zeros and marked by `mask`.
  epoch_order, global_batch_positions, process_slice: the index logic, pure functions.
  measure_input_throughput(source, config, mesh, num_batches=50) -> images/sec of the
      training iterator alone (no model).

grain runs it: a random-access dataset of batches (element = step), read ahead by a thread
or by `worker_count` worker processes (decoding and host crops happen there), then put on
the devices by a thread. The order of examples is `epoch_order`: a permutation per
(seed, epoch), drawn for a whole epoch at once (grain's per-element shuffle costs ~10x more
per image for in-memory data).
"""
from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh

from vit_jax import errors, host_memory, parallel
from vit_jax.data.sources import Batch, Source


# --- Index logic -------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples (a permutation)."""
  if not shuffle:
    order = np.arange(num_examples)
  else:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False  # Cached and shared: nobody may change it.
  return order


def global_batch_positions(step: int, batch_size: int) -> np.ndarray:
  """Positions of batch `step` in the endless concatenation of epoch orders."""
  return np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)


def process_slice(global_rows: np.ndarray, process_index: int,
                  process_count: int) -> np.ndarray:
  """The contiguous rows of a global batch that process `process_index` reads and holds."""
  if len(global_rows) % process_count:
    raise errors.DataError(f"A batch of {len(global_rows)} does not split over "
                     f"{process_count} processes.")
  per_process = len(global_rows) // process_count
  return global_rows[process_index * per_process:(process_index + 1) * per_process]


def _example_indices(positions: np.ndarray, num_examples: int, seed: int,
                     shuffle: bool) -> np.ndarray:
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs):  # A batch may straddle epochs; never drop examples.
    rows = epochs == epoch
    indices[rows] = epoch_order(num_examples, seed, int(epoch), shuffle)[offsets[rows]]
  return indices


def _to_global(local: Batch, *, batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
  sharding = parallel.batch_sharding(mesh)
  if mesh.devices.flat[0].platform == "cpu":  # Aligned host memory goes in without a copy.
    local = {k: host_memory.aligned(v) for k, v in local.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
          for k, v in local.items()}


# --- Batches on grain ------------------------------------------------------------------------


def _train_rows(source: Source, batch_size: int, seed: int, shuffle: bool, process_index: int,
                process_count: int, step: int) -> Batch:
  """This process's rows of training batch `step`, read (and on the host augmented)."""
  positions = process_slice(global_batch_positions(step, batch_size), process_index,
                            process_count)
  indices = _example_indices(positions, len(source), seed, shuffle)
  return source.get_train(indices, positions, seed)


def _eval_rows(source: Source, batch_size: int, process_index: int, process_count: int,
               index: int) -> Batch:
  """This process's rows of evaluation batch `index`: past the end, zeros with mask False."""
  positions = process_slice(global_batch_positions(index, batch_size), process_index,
                            process_count)
  mask = positions < len(source)
  examples = source.get(positions[mask])
  if not mask.all():
    padded = {k: np.zeros((len(positions), *v.shape[1:]), v.dtype) for k, v in examples.items()}
    for k, v in examples.items():
      padded[k][mask] = v
    examples = padded
  return {**examples, "mask": mask}


def _batches(rows: Callable[[int], Batch], steps: grain.MapDataset, batch_size: int,
             mesh: Mesh, worker_count: int, prefetch: int) -> grain.DatasetIterator:
  """grain: `rows(step)` for each element of `steps`, computed ahead in `worker_count`
  processes (0: a thread of this one), then put on the devices as global arrays by a
  thread.

  Each element is a whole batch: reading an in-memory split is then one indexing per
  batch, and a worker decodes its batch's images with a pool of threads.
  """
  batches = steps.map(rows).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
  if worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults here).
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=prefetch))
  batches = batches.map(functools.partial(_to_global, batch_size=batch_size, mesh=mesh))
  return iter(grain.experimental.ThreadPrefetchIterDataset(
      batches, prefetch_buffer_size=prefetch))


def _close(iterator: grain.DatasetIterator | None) -> None:
  """Stops grain's threads and worker processes now rather than at garbage collection."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


# --- Training and evaluation batches ---------------------------------------------------


class TrainIterator:
  """Endless, deterministic training batches: dict(image=uint8, label=int32) jax.Arrays.

  Batch `step` holds positions [step*B, (step+1)*B) of the concatenated epoch orders
  (`epoch_order`), so it depends only on (seed, step, len(source)): restoring the step
  is enough to resume, in O(1), on any number of processes and input workers (grain's
  dataset of batches is random access: it starts at the step).
  """

  def __init__(self, source: Source, *, batch_size: int, seed: int, mesh: Mesh,
               start_step: int = 0, shuffle: bool = True, worker_count: int = 0,
               prefetch: int = 2):
    parallel.check_batch_divides(batch_size)
    if not len(source):
      raise errors.DataError(f"{source.name}:{source.split} has no examples to train on.")
    self.source = source
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self._rows = functools.partial(_train_rows, source, batch_size, seed, shuffle,
                                   jax.process_index(), jax.process_count())
    self._mesh, self._workers, self._depth = mesh, worker_count, prefetch
    self._step = start_step
    self._batches: grain.DatasetIterator | None = None

  @property
  def step(self) -> int:
    """Batches produced so far (the step of the next batch)."""
    return self._step

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._batches is None:
      steps = grain.MapDataset.range(self._step, sys.maxsize)
      self._batches = _batches(self._rows, steps, self.batch_size, self._mesh,
                               self._workers, self._depth)
    try:
      batch = next(self._batches)
    except BaseException:
      self.close()  # The next call starts over at this step (and meets the error again).
      raise
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; `set_state` of it resumes with the next batch."""
    return {"step": self._step, "seed": self.seed, "batch_size": self.batch_size,
            "num_examples": len(self.source), "shuffle": self.shuffle}

  def set_state(self, state: dict[str, Any]) -> None:
    mine = self.get_state()
    changed = {k: (state.get(k), v) for k, v in mine.items()
               if k != "step" and state.get(k) != v}
    if changed:
      details = ", ".join(f"{k}: saved {old}, now {new}" for k, (old, new) in changed.items())
      raise errors.DataError(f"Cannot resume the input pipeline of a different run ({details}): "
                       "the batches would differ. Restore the original settings.")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops grain's threads and workers; iterating again restarts them at the current step."""
    _close(self._batches)
    self._batches = None

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def train_iterator(source: Source, *, batch_size: int, seed: int, mesh: Mesh,
                   start_step: int = 0, shuffle: bool = True,
                   worker_count: int = 0) -> TrainIterator:
  """Training batches of `source`; see `TrainIterator`."""
  return TrainIterator(source, batch_size=batch_size, seed=seed, mesh=mesh,
                       start_step=start_step, shuffle=shuffle, worker_count=worker_count)


class EvalBatches:
  """Every example of a source exactly once, in order: dict(image, label, mask).

  ceil(N / batch_size) batches on every process; the last is padded with zero images
  and label 0, marked False in `mask`. Iterate it again for each evaluation.
  """

  def __init__(self, source: Source, *, batch_size: int, mesh: Mesh, worker_count: int = 0,
               prefetch: int = 2):
    parallel.check_batch_divides(batch_size, "config.eval_batch_size")
    self.source = source
    self.batch_size = batch_size
    self._rows = functools.partial(_eval_rows, source, batch_size, jax.process_index(),
                                   jax.process_count())
    self._mesh, self._workers, self._depth = mesh, worker_count, prefetch

  @property
  def num_examples(self) -> int:
    return len(self.source)

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    batches = _batches(self._rows, grain.MapDataset.range(len(self)), self.batch_size,
                       self._mesh, self._workers, self._depth)
    try:
      yield from batches
    finally:
      _close(batches)


def eval_batches(source: Source, *, batch_size: int, mesh: Mesh,
                 worker_count: int = 0) -> EvalBatches:
  """Evaluation batches of `source`; see `EvalBatches`."""
  return EvalBatches(source, batch_size=batch_size, mesh=mesh, worker_count=worker_count)


def measure_input_throughput(source: Source, config: ml_collections.ConfigDict, mesh: Mesh,
                             num_batches: int = 50) -> float:
  """Images/sec that the training iterator over `source` alone delivers (no model), at
  the config's batch size and seed: after a first batch from every worker, so that their
  start (a Python process each) is not timed."""
  workers = config.input.worker_count
  with train_iterator(source, batch_size=config.batch_size, seed=config.seed, mesh=mesh,
                      worker_count=workers) as batches:
    for _ in range(max(1, workers)):
      jax.block_until_ready(next(batches))
    start = time.perf_counter()
    for _ in range(num_batches):
      jax.block_until_ready(next(batches))
    elapsed = time.perf_counter() - start
  return num_batches * config.batch_size / elapsed
