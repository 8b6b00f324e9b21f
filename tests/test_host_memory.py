"""host_memory: after keep_freed_memory(), a repeated XLA step reuses its pages."""
import subprocess
import sys

import pytest

# A jitted step with a 64 MB temporary (a matmul output), run three times; prints the minor
# page faults of the third run.
_PROBE = """
import resource, sys
from vit_jax import host_memory
if sys.argv[1] == "tuned":
  assert host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum())
x = jnp.ones((4096, 256)) / 256
for _ in range(2):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_repeated_step_stops_page_faulting():
  # 64 MB is 16,384 pages: untuned, every run faults them in again.
  assert _faults("default") > 12_000
  assert _faults("tuned") < 1_000
