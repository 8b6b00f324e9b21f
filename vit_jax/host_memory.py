"""Keep freed host memory in the process, so CPU train steps stop page-faulting.

XLA's CPU backend mallocs each step's large temporaries on a worker thread. glibc serves
a block that large from a fresh mmap and unmaps it on free, so every step faults in every
page again and spends its time in the kernel. With a single arena that takes large blocks
from the heap and never trims it, the next step reuses the same pages: no faults. The
cost: the process keeps its peak heap until it exits, which a training run does anyway.
docs/performance.md has the measurements.
"""
from __future__ import annotations

import ctypes
import sys

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
