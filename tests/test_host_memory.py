"""host_memory: after keep_freed_memory(), freed blocks keep their pages and XLA steps reuse
them; batches built in `empty` go to CPU devices without a copy."""
import statistics
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import host_memory, parallel
from vit_jax.data import pipeline

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

# malloc, fill and free a 64 MB block five times; prints the minor page faults of each round.
_MALLOC_PROBE = """
import ctypes, resource, sys
from vit_jax import host_memory
if sys.argv[1] == "tuned":
  assert host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  libc.free(block)
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# A jitted step with a 64 MB temporary (a matmul output), run twelve times; prints the
# minor page faults of runs 3 to 12 each.
_XLA_PROBE = """
import resource
from vit_jax import host_memory
assert host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum())
x = jnp.ones((4096, 256)) / 256
for _ in range(2):
  step(x).block_until_ready()
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(probe: str, *args: str) -> list[int]:
  out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  return [int(n) for n in out.stdout.split()]


@glibc_only
def test_freed_block_keeps_its_pages():
  # glibc serves 64 MB (past its 32 MB largest mmap threshold) from a fresh mmap and unmaps
  # it on free: every round faults in all 16,384 pages again (fewer where the kernel maps
  # large folios per fault). Tuned, only the first round faults.
  untuned, tuned = _faults(_MALLOC_PROBE, "default"), _faults(_MALLOC_PROBE, "tuned")
  assert min(untuned) > 1_000
  assert tuned[0] > 1_000 and max(tuned[1:]) < 10


@glibc_only
def test_repeated_xla_step_stops_page_faulting():
  # Untuned, whether a run faults depends on which thread frees the temporary (seen: from 0
  # to 2,560 faults per run on one machine), so only the tuned side is asserted. Tuned, a
  # run faults only when the heap grows, as it may in a few of the first runs: the median.
  assert statistics.median(_faults(_XLA_PROBE)) < 100


# --- Aligned batches -------------------------------------------------------------------------


@pytest.mark.parametrize("shape, dtype", [((256, 224, 224, 3), np.uint8), ((7,), np.int32),
                                          ((3, 5), np.float32)])
def test_empty_is_64_byte_aligned(shape, dtype):
  for _ in range(5):  # numpy's own allocations land on 16-byte boundaries.
    x = host_memory.empty(shape, dtype)
    assert (x.shape, x.dtype, x.ctypes.data % 64, x.flags.c_contiguous) == (
        shape, np.dtype(dtype), 0, True)


def test_aligned_keeps_aligned_arrays_and_copies_the_others():
  x = host_memory.empty((4, 8, 8, 3), np.uint8)
  x[...] = np.arange(x.size, dtype=np.uint8).reshape(x.shape)
  assert host_memory.aligned(x) is x
  unaligned = np.frombuffer(x.tobytes() + b"\0", np.uint8)[1:]  # Ends up odd-addressed.
  copy = host_memory.aligned(x[:, ::2])  # Not contiguous.
  assert copy.ctypes.data % 64 == 0 and host_memory.aligned(unaligned).ctypes.data % 64 == 0
  np.testing.assert_array_equal(copy, x[:, ::2])


def test_cpu_devices_take_aligned_batches_without_a_copy():
  """The reason for `empty`: jax's CPU client aliases aligned host memory (else copies)."""
  mesh = parallel.make_mesh()
  image = host_memory.empty((len(jax.devices()) * 2, 8, 8, 3), np.uint8)
  image[...] = 7
  label = np.arange(len(image), dtype=np.int32)  # numpy's 16-byte alignment: moved.
  batch = pipeline._to_global({"image": image, "label": label}, batch_size=len(image),
                              mesh=mesh)
  shards = [np.asarray(s.data) for s in batch["image"].addressable_shards]
  assert all(np.shares_memory(s, image) for s in shards)
  np.testing.assert_array_equal(np.asarray(batch["label"]), label)
