"""Host memory for CPU runs: keep freed memory in the process, so CPU train steps stop
page-faulting; allocate batches where the CPU devices can use them without a copy.

XLA's CPU backend mallocs each step's large temporaries on a worker thread. glibc serves
a block that large from a fresh mmap and unmaps it on free, so every step faults in every
page again and spends its time in the kernel. With a single arena that takes large blocks
from the heap and never trims it, the next step reuses the same pages: no faults. The
cost: the process keeps its peak heap until it exits, which a training run does anyway.
docs/performance.md has the measurements.

jax's CPU client uses a host array in place (zero-copy) when its data starts on a 64-byte
boundary, and copies it otherwise, slower than a memcpy would (docs/performance.md). numpy
aligns to 16 bytes only, so batches are built in `empty` arrays or moved by `aligned`.
"""
from __future__ import annotations

import ctypes
import math
import sys

import numpy as np
import numpy.typing as npt

# XLA's CPU client aliases host buffers aligned to this many bytes (its minimum alignment).
_DEVICE_ALIGNMENT = 64

# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
  """Tune glibc malloc as above; True if it was applied (Linux with glibc only).

  Call it before jax starts its backend: threads that already have their own arena keep
  it, and their large blocks would still come from mmap.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # Another libc (e.g. musl): nothing to tune.
    return False
  settings = ((_M_ARENA_MAX, 1),  # Every thread allocates from the main heap...
              (_M_MMAP_MAX, 0),  # ...large blocks included...
              (_M_TRIM_THRESHOLD, -1))  # ...which is never returned to the kernel.
  return all(mallopt(param, value) == 1 for param, value in settings)


def empty(shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
  """An uninitialised array whose data starts on a 64-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _DEVICE_ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % _DEVICE_ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned(x: np.ndarray) -> np.ndarray:
  """`x` itself if it is C-contiguous and 64-byte aligned, else an aligned copy.

  CPU devices then share the memory: nothing may write to `x` (or the copy) afterwards.
  """
  if x.flags.c_contiguous and x.ctypes.data % _DEVICE_ALIGNMENT == 0:
    return x
  out = empty(x.shape, x.dtype)
  np.copyto(out, x)
  return out
