"""Deterministic, resumable training batches and exact evaluation batches over a Source.

The same code feeds one CPU, GPUs or a TPU pod: every batch is a global `jax.Array`
split along the mesh's "data" axis, and each process reads only its own rows.

  train_iterator(source, *, batch_size, seed, mesh, start_step=0, shuffle=True)
      -> TrainIterator: endless dict(image, label) batches; `get_state()` / `set_state()`
      save and restore the position (the step) so a resumed run sees the same batches.
  eval_batches(source, *, batch_size, mesh) -> EvalBatches: re-iterable; every example
      once, the last batch padded with zeros and marked by `mask`.
  epoch_order, global_batch_positions, process_slice: the index logic, pure functions.
  measure_input_throughput(source, config, mesh, num_batches=50) -> images/sec of the
      training iterator alone (no model).
"""
from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vit_jax import errors, parallel
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


def _to_global(local: Batch, batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
  sharding = parallel.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
          for k, v in local.items()}


# --- Prefetching ----------------------------------------------------------------------------

_DONE = object()


def _produce(make_batch: Callable[[int], Any], steps: Iterator[int], out: queue.Queue,
             stop: threading.Event) -> None:
  """Thread body: batches in step order into `out` until `stop` or the steps run out."""

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  try:
    for step in steps:
      if not put(make_batch(step)):
        return
    put(_DONE)
  except BaseException as e:  # Re-raised in the consumer, where it can be seen.
    put(e)


class _Prefetcher:
  """Makes `make_batch(step)` for each step on a background thread, `depth` ahead."""

  def __init__(self, make_batch: Callable[[int], Any], steps: Iterator[int], depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    thread = threading.Thread(target=_produce, daemon=True, name="input-prefetch",
                              args=(make_batch, steps, self._queue, self._stop))
    thread.start()
    # Stops the thread when this object is closed, collected, or at interpreter exit.
    self._finalizer = weakref.finalize(self, _stop_thread, self._stop, thread)

  def next(self) -> Any:
    item = self._queue.get()
    if item is _DONE:
      self.close()
      raise StopIteration
    if isinstance(item, BaseException):
      self.close()
      raise item
    return item

  def close(self) -> None:
    self._finalizer()


def _stop_thread(stop: threading.Event, thread: threading.Thread) -> None:
  stop.set()
  if thread is not threading.current_thread():
    thread.join(timeout=10)


# --- Training and evaluation batches ---------------------------------------------------


class TrainIterator:
  """Endless, deterministic training batches: dict(image=uint8, label=int32) jax.Arrays.

  Batch `step` holds positions [step*B, (step+1)*B) of the concatenated epoch orders
  (`epoch_order`), so it depends only on (seed, step, len(source)): restoring the step
  is enough to resume, in O(1), on any number of processes.
  """

  def __init__(self, source: Source, *, batch_size: int, seed: int, mesh: Mesh,
               start_step: int = 0, shuffle: bool = True, prefetch: int = 2):
    parallel.check_batch_divides(batch_size)
    if not len(source):
      raise errors.DataError(f"{source.name}:{source.split} has no examples to train on.")
    self.source = source
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    # Holds no reference to `self`, so a forgotten iterator can still be collected
    # (which stops its prefetch thread).
    self._make_batch = functools.partial(_train_batch, source, batch_size, seed, shuffle,
                                         mesh)
    self._depth = prefetch
    self._step = start_step
    self._prefetcher: _Prefetcher | None = None

  @property
  def step(self) -> int:
    """Batches produced so far (the step of the next batch)."""
    return self._step

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._prefetcher is None:
      self._prefetcher = _Prefetcher(self._make_batch, itertools.count(self._step),
                                     self._depth)
    try:
      batch = self._prefetcher.next()
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
    """Stops the prefetch thread; iterating again restarts it at the current step."""
    if self._prefetcher is not None:
      self._prefetcher.close()
      self._prefetcher = None

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def _train_batch(source: Source, batch_size: int, seed: int, shuffle: bool, mesh: Mesh,
                 step: int) -> dict[str, jax.Array]:
  positions = global_batch_positions(step, batch_size)
  local = process_slice(positions, jax.process_index(), jax.process_count())
  indices = _example_indices(local, len(source), seed, shuffle)
  return _to_global(source.get(indices), batch_size, mesh)


def train_iterator(source: Source, *, batch_size: int, seed: int, mesh: Mesh,
                   start_step: int = 0, shuffle: bool = True) -> TrainIterator:
  """Training batches of `source`; see `TrainIterator`."""
  return TrainIterator(source, batch_size=batch_size, seed=seed, mesh=mesh,
                       start_step=start_step, shuffle=shuffle)


class EvalBatches:
  """Every example of a source exactly once, in order: dict(image, label, mask).

  ceil(N / batch_size) batches on every process; the last is padded with zero images
  and label 0, marked False in `mask`. Iterate it again for each evaluation.
  """

  def __init__(self, source: Source, *, batch_size: int, mesh: Mesh, prefetch: int = 2):
    parallel.check_batch_divides(batch_size, "config.eval_batch_size")
    self.source = source
    self.batch_size = batch_size
    self._mesh = mesh
    self._depth = prefetch

  @property
  def num_examples(self) -> int:
    return len(self.source)

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    prefetcher = _Prefetcher(
        functools.partial(_eval_batch, self.source, self.batch_size, self._mesh),
        iter(range(len(self))), self._depth)
    try:
      while True:
        try:
          yield prefetcher.next()
        except StopIteration:
          return
    finally:
      prefetcher.close()


def _eval_batch(source: Source, batch_size: int, mesh: Mesh,
                index: int) -> dict[str, jax.Array]:
  positions = global_batch_positions(index, batch_size)
  local = process_slice(positions, jax.process_index(), jax.process_count())
  mask = local < len(source)
  examples = source.get(local[mask])
  if not mask.all():
    padded = {k: np.zeros((len(local), *v.shape[1:]), v.dtype) for k, v in examples.items()}
    for k, v in examples.items():
      padded[k][mask] = v
    examples = padded
  return _to_global({**examples, "mask": mask}, batch_size, mesh)


def eval_batches(source: Source, *, batch_size: int, mesh: Mesh) -> EvalBatches:
  """Evaluation batches of `source`; see `EvalBatches`."""
  return EvalBatches(source, batch_size=batch_size, mesh=mesh)


def measure_input_throughput(source: Source, config: ml_collections.ConfigDict, mesh: Mesh,
                             num_batches: int = 50) -> float:
  """Images/sec that the training iterator over `source` alone delivers (no model), at
  the config's batch size and seed."""
  with train_iterator(source, batch_size=config.batch_size, seed=config.seed,
                      mesh=mesh) as batches:
    jax.block_until_ready(next(batches))  # Starts the thread and fills first caches.
    start = time.perf_counter()
    for _ in range(num_batches):
      jax.block_until_ready(next(batches))
    elapsed = time.perf_counter() - start
  return num_batches * config.batch_size / elapsed
