"""parallel.py: FSDP trains like data parallelism, and its compiled step communicates only
by gathering parameters and reducing gradients; cluster start-up; pacing the host (XLA's CPU
client deadlocks, and aborts the process 40 s later, when the host dispatches more than 32
multi-device programs with collectives ahead of 8 simulated devices: DispatchLimit keeps it
a few steps ahead)."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import step_kit

from vit_jax import config as config_lib, errors, parallel
from vit_jax.train import metrics, steps

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute")


def _built(fsdp: bool, width: int = 64):
  config = config_lib.get_base_config()
  config.model.overrides.update(dict(width=width, depth=2, num_heads=2, mlp_dim=2 * width))
  config.total_steps, config.fsdp, config.batch_size = 10, fsdp, 16
  config.optim.warmup_steps = 0
  return step_kit.build_step(config, (32, 32, 3))


def _batch(mesh, seed):
  return step_kit.random_batch(mesh, seed, 16, (32, 32, 3))


def _collectives(text: str) -> dict[str, list[str]]:
  """Output shapes of each kind of collective in compiled HLO text."""
  found = {op: [] for op in _COLLECTIVES}
  for line in text.splitlines():
    match = re.search(r"= (.+?) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(", line)
    if match:
      found[match.group(2)].append(match.group(1))
  return found


def test_fsdp_splits_large_leaves_and_trains_like_data_parallel():
  results = {}
  for fsdp in (False, True):
    mesh, state, step = _built(fsdp)
    specs = {jax.tree_util.keystr(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    for _ in range(2):
      state, metrics = step(state, _batch(mesh, 0))
    results[fsdp] = (specs, jax.device_get(state.params), float(metrics["loss"]))
  (dp_specs, dp_params, dp_loss), (fsdp_specs, fsdp_params, fsdp_loss) = (results[False],
                                                                         results[True])
  assert all(spec == jax.sharding.PartitionSpec() for spec in dp_specs.values())
  kernel = "['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']"  # 64 x 128.
  assert fsdp_specs[kernel] == jax.sharding.PartitionSpec(None, "data")
  bias = "['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['bias']"  # 128 < 4096.
  assert fsdp_specs[bias] == jax.sharding.PartitionSpec()
  np.testing.assert_allclose(fsdp_loss, dp_loss, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(dp_params), jax.tree_util.tree_leaves(fsdp_params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("fsdp", [False, True])
def test_the_step_communicates_by_parameter_gathers_and_gradient_reductions_only(fsdp):
  mesh, state, step = _built(fsdp)
  text = step.lower(state, _batch(mesh, 0)).compile().as_text()
  found = _collectives(text)
  # Activations never move between devices: no all-to-all, no permute.
  assert not found["all-to-all"] and not found["collective-permute"], found
  assert found["all-reduce"]  # The gradient reduction (CPU XLA writes reduce-scatters so).
  # Gathered: parameters (as stored, or reshaped), or the CPU layers' q/k/v kernels side
  # by side; never anything with the batch axis (16).
  sizes = {x.size for x in jax.tree_util.tree_leaves(state.params)}
  qkv = 3 * state.params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"][
      "query"]["kernel"].size
  gathered = [tuple(int(d) for d in re.findall(r"\d+", shape.split("{")[0][4:]))
              for shape in found["all-gather"]]
  if fsdp:
    assert gathered and all(16 not in shape and np.prod(shape) in sizes | {qkv}
                            for shape in gathered), (gathered, sizes)
  else:
    assert not gathered, gathered


# --- Cluster start-up -------------------------------------------------------------------------


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ,cluster", [
    ({}, None),
    (SLURM, "SLURM"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),  # One task: nothing to join.
    ({k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}, None),  # Not a job step.
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4"},
     "Open MPI"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_clusters_are_detected_from_the_environment(environ, cluster):
  assert parallel.detect_cluster(environ) == cluster


def test_open_mpi_5_asks_for_the_flags():
  # Open MPI 5 (PRRTE) sets no OMPI_MCA_orte_hnp_uri: jax.distributed cannot find rank 0.
  with pytest.raises(errors.UsageError) as error:
    parallel.detect_cluster({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                             "PMIX_RANK": "1", "PRTE_LAUNCHED": "1"})
  assert str(error.value) == (
      "mpirun started 2 processes, but this Open MPI (5 or later) does not tell "
      "jax.distributed where they meet: pass --coordinator_address=HOST:PORT (a free port "
      "on the host of rank 0) --num_processes=$OMPI_COMM_WORLD_SIZE "
      "--process_id=$OMPI_COMM_WORLD_RANK.")


def test_a_coordinator_address_alone_asks_for_the_other_flags():
  # A fresh process: jax.distributed starts only before the first computation.
  script = ("from vit_jax import errors, parallel\n"
            "try:\n  parallel.initialize_distributed(None, None, None)\n"
            "except errors.UsageError as e:\n  print(e)\n")
  env = {**os.environ, "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}  # No Kubernetes to ask.
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  assert out.stdout.splitlines()[-1] == (
      "The processes of the run could not be joined (JAX_COORDINATOR_ADDRESS: Number of "
      "processes must be defined.): give every process --coordinator_address=HOST:PORT "
      "--num_processes=N --process_id=I.")


def test_processes_join_by_flags_else_by_the_cluster_else_not_at_all(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.config, "update", lambda *args: None)
  monkeypatch.setattr(parallel, "detect_cluster", lambda: None)
  assert parallel.initialize_distributed(None, None, None) is None and calls == []
  assert parallel.initialize_distributed("h:1", 2, 0) == "flags"
  assert calls.pop() == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
  monkeypatch.setattr(parallel, "detect_cluster", lambda: "SLURM")
  assert parallel.initialize_distributed(None, None, None) == "SLURM"
  # JAX finds the coordinator, process count and index itself.
  assert calls.pop() == {"coordinator_address": None, "num_processes": None,
                         "process_id": None}


def test_processes_without_a_distributed_client_agree_to_stop(monkeypatch):
  import signal
  from jax.experimental import multihost_utils
  from vit_jax.train import preemption
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  others = [0]
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda flag: np.array([int(flag), others[0]]))
  stop = preemption.StopSignal()
  try:
    # Its own handler (no preemption service to leave SIGTERM to).
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert not stop.should_stop(1)
    others[0] = 1  # The other process got SIGTERM: this one stops at the same step.
    assert stop.should_stop(2) and stop.received == "SIGTERM"
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGTERM) != stop._handle


# Far more steps than the 32 unfinished programs per device XLA's CPU client admits.
NUM_STEPS = 300


def test_dispatch_limit_waits_for_the_oldest_step_only(monkeypatch):
  waited = []
  monkeypatch.setattr(jax, "block_until_ready", waited.append)
  limit = parallel.DispatchLimit(steps_ahead=3)
  for step in range(1, 7):
    limit.add(step)
  assert waited == [1, 2, 3]


def _collective_setup():
  """A step with an all-reduce over the 8 devices (a batch-sharded input, a replicated
  sum): the kind of program whose unbounded run-ahead deadlocked."""
  assert jax.device_count() == 8
  mesh = parallel.make_mesh()
  w = jax.device_put(jnp.full((128, 128), 1 / 128, jnp.float32), parallel.replicated(mesh))
  x = jax.device_put(jnp.ones((512, 128), jnp.float32), parallel.batch_sharding(mesh))
  return mesh, w, x


def test_paced_collective_steps_run_to_the_end():
  _, w, x = _collective_setup()
  step = jax.jit(lambda w, x: jnp.sum(jnp.tanh(x @ w) @ w))
  limit = parallel.DispatchLimit()
  outputs = []
  for _ in range(NUM_STEPS):
    outputs.append(step(w, x))
    limit.add(outputs[-1])
  expected = 512 * 128 * np.tanh(1.0)
  np.testing.assert_allclose(jax.device_get(outputs), [expected] * NUM_STEPS, rtol=1e-5)


def test_eval_totals_over_many_batches_count_every_example_once():
  mesh, _, _ = _collective_setup()
  batch_size, num_classes = 64, 10
  rng = np.random.default_rng(0)
  kernel = jax.device_put(jnp.asarray(rng.normal(size=(16, num_classes)), jnp.float32),
                          parallel.replicated(mesh))
  features = rng.normal(size=(NUM_STEPS, batch_size, 16)).astype(np.float32)
  labels = rng.integers(0, num_classes, (NUM_STEPS, batch_size)).astype(np.int32)
  masks = rng.random((NUM_STEPS, batch_size)) < 0.9
  sharded = parallel.batch_sharding(mesh)
  batches = [{"x": jax.device_put(features[i], sharded),
              "label": jax.device_put(labels[i], sharded),
              "mask": jax.device_put(masks[i], sharded)} for i in range(NUM_STEPS)]
  eval_step = jax.jit(lambda params, b: metrics.eval_sums(b["x"] @ params, b["label"], b["mask"]),
                      out_shardings=parallel.replicated(mesh))
  totals = steps.eval_totals(eval_step, kernel, batches)
  logits = features @ np.asarray(kernel)
  top1 = (logits.argmax(-1) == labels) & masks
  assert int(totals["count"]) == int(masks.sum())
  assert int(totals["top1_sum"]) == int(top1.sum())
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels[masks], logits.argmax(-1)[masks]), 1)
  np.testing.assert_array_equal(totals["confusion"], confusion)
