"""Device mesh, shardings and multi-host start-up.

One mesh axis, "data": batches are split along it; parameters are replicated over it,
or split along it too when FSDP is on (see `tree_shardings`). Under FSDP the model pins
its activations to the batch axis at block boundaries (`constrain_batch`), so that the
compiled step holds parameter all-gathers and gradient reductions only.
"""
from __future__ import annotations

import collections
import importlib.util
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import errors

DATA_AXIS = "data"
# FSDP leaves smaller than this (biases, LayerNorm scales, small heads) replicated: each
# split leaf costs an all-gather and a gradient reduction per step, whatever its size, and
# small split leaves made XLA move activations between devices (all-to-alls) instead.
FSDP_MIN_ELEMENTS = 4096


def detect_cluster(environ=os.environ) -> str | None:
  """The cluster job this process is one of several processes of, from its environment
  (the variables jax.distributed reads to find the others), or None."""
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(k in environ for k in slurm) and int(environ["SLURM_NTASKS"]) > 1:
    return "SLURM"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
    if "OMPI_MCA_orte_hnp_uri" in environ:
      return "Open MPI"
    # Open MPI 5 (PRRTE) no longer names the launcher's address, which jax.distributed reads.
    raise errors.UsageError(
        f"mpirun started {environ['OMPI_COMM_WORLD_SIZE']} processes, but this Open MPI (5 "
        "or later) does not tell jax.distributed where they meet: pass "
        "--coordinator_address=HOST:PORT (a free port on the host of rank 0) "
        "--num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK.")
  if environ.get("JAX_COORDINATOR_ADDRESS"):  # Kubernetes JobSets and hand-made launchers.
    return "JAX_COORDINATOR_ADDRESS"
  if (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")) and (
      importlib.util.find_spec("libtpu") is not None):
    return "Cloud TPU"  # jax.distributed asks the TPU VM's metadata server for the rest.
  return None


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> str | None:
  """Joins the processes of a multi-host run: by the flags when given, else where
  `detect_cluster` finds a cluster (JAX then finds the coordinator, process count and
  index itself); a single process stays as it is. Returns how it was joined, or None.
  """
  how = ("flags" if coordinator_address or num_processes or process_id is not None
         else detect_cluster())
  if how is None:
    return None
  # CPU processes need a collectives backend to exchange data (GPUs/TPUs have their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except ValueError as e:  # A setting it could neither detect nor was given.
    raise errors.UsageError(
        f"The processes of the run could not be joined ({how}: {e}): give every process "
        "--coordinator_address=HOST:PORT --num_processes=N --process_id=I.") from None
  return how


def make_mesh() -> Mesh:
  """All devices of all processes on the one data axis."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divides(batch_size: int, what: str = "config.batch_size") -> None:
  """Stops with the numbers when a global batch does not split evenly over devices."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if batch_size % n_dev:
    lower, upper = batch_size // n_dev * n_dev, (batch_size // n_dev + 1) * n_dev
    raise errors.ConfigError(
        f"{what}={batch_size} does not divide evenly over {n_dev} devices "
        f"({n_proc} process(es) x {jax.local_device_count()} local): use a multiple of "
        f"{n_dev}, e.g. {lower or upper} or {upper}.")


def _leaf_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> NamedSharding:
  """FSDP splits a leaf's largest axis that divides by the device count (leaves of at
  least FSDP_MIN_ELEMENTS); everything else is replicated."""
  n = mesh.shape[DATA_AXIS]
  if fsdp and n > 1 and int(np.prod(shape)) >= FSDP_MIN_ELEMENTS:
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % n == 0 and shape[axis] >= n:
        spec = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_shardings(abstract_tree, mesh: Mesh, fsdp: bool):
  """Shardings for parameters and optimiser state (replicated, or FSDP-split)."""
  return jax.tree_util.tree_map(lambda x: _leaf_sharding(tuple(x.shape), mesh, fsdp),
                                abstract_tree)


def traced_over(mesh: Mesh):
  """A context for tracing a step that runs over `mesh`: `constrain_batch` in the model then
  knows the data axis (inside jax.jit, where jax.set_mesh cannot be used)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins x's leading (batch) axis to the data axis of the mesh the step is traced over.

  With FSDP the parameters are split over the same axis as the batch; left free, XLA
  moved activations between devices (all-to-alls) instead of gathering the parameters.
  A no-op outside `traced_over` (evaluation of a lone model, tests of the model).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def to_host(x) -> np.ndarray:
  """A whole array on this host, also one sharded over several hosts."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def processes_where_not(ok: bool) -> list[int]:
  """The indices of the processes whose `ok` is False; every process must call it, and all
  get the same list (so that they take the same branch after it)."""
  if jax.process_count() == 1:
    return [] if ok else [0]
  oks = np.ravel(multihost_utils.process_allgather(np.int32(ok)))
  return [i for i, process_ok in enumerate(oks) if not process_ok]


def sync(name: str) -> None:
  """Waits until every process of the run gets here (a no-op for one process)."""
  multihost_utils.sync_global_devices(name)


# --- Pacing the host -------------------------------------------------------------------------

# How many dispatched steps the host may run ahead of the devices. XLA's CPU client admits
# at most 32 unfinished programs per device: the launch of the 33rd blocks a thread of the
# pool that also runs the devices' executions. With several CPU devices in one process
# (--xla_force_host_platform_device_count, as in the tests) a program with a collective
# needs all of them running at once; with some of those threads blocked in launches it
# waits at the rendezvous for good, and XLA aborts the process after 40 s ("Termination
# timeout for `all reduce ...`", "Fatal Python error: Aborted"). A few steps ahead keep the
# devices as busy as many do.
MAX_STEPS_AHEAD = 8


class DispatchLimit:
  """Keeps the host at most `steps_ahead` dispatched steps ahead of the devices.

    limit = DispatchLimit()
    for batch in batches:
      state, metrics = step(state, batch)
      limit.add(metrics)   # Waits for the step `steps_ahead` before this one.

  `add` takes any output of a step (not one donated to a later step); once the host is
  more than `steps_ahead` steps ahead it waits for the oldest one's output. A device runs
  its programs in the order they were dispatched, so what came before it is done too.
  """

  def __init__(self, steps_ahead: int = MAX_STEPS_AHEAD):
    self._pending = collections.deque()
    self._steps_ahead = steps_ahead

  def add(self, outputs) -> None:
    self._pending.append(outputs)
    if len(self._pending) > self._steps_ahead:
      jax.block_until_ready(self._pending.popleft())
