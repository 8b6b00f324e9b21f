"""The main job end to end on real Fashion-MNIST: learning, exact resume, device counts,
multi-host equivalence, evaluation mode."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.train import steps

REPO = pathlib.Path(__file__).resolve().parents[1]

# A 2-block, 32-wide ViT on 1024 training images: seconds per run.
TINY = ["--config.train_split=train[:1024]", "--config.eval_split=test[:300]",
        "--config.batch_size=64", "--config.eval_batch_size=64",
        "--config.model.overrides.width=32", "--config.model.overrides.depth=2",
        "--config.model.overrides.num_heads=2", "--config.model.overrides.mlp_dim=64",
        "--config.optim.warmup_steps=2", "--config.log_every_steps=2"]


def main_command(workdir, dirs, *overrides, mode="train"):
  manual_dir, data_dir = dirs
  return [sys.executable, str(REPO / "main.py"), f"--mode={mode}",
          "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
          f"--config.manual_dir={manual_dir}", f"--config.data_dir={data_dir}",
          *TINY, *overrides]


def env_with(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "PYTHONUNBUFFERED": "1"}


def run(cmd, devices=8, **kwargs) -> subprocess.CompletedProcess:
  out = subprocess.run(cmd, cwd=REPO, env=env_with(devices), capture_output=True, text=True,
                       timeout=600, **kwargs)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def metric_rows(workdir) -> list[dict]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  # Wall-clock rates differ between runs; everything else must match.
  return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in rows]


def latest_state(workdir):
  from vit_jax.train import workdir as workdir_lib
  return workdir_lib.load_trained(str(workdir), "latest")


def test_training_learns_fashion_mnist(fashion_mnist_dirs, tmp_path):
  from vit_jax.configs import fashion_mnist
  from vit_jax import train
  config = fashion_mnist.get_config()
  config.manual_dir, config.data_dir = fashion_mnist_dirs
  config.train_split, config.eval_split = "train[:12800]", "test[:1000]"
  config.model.overrides.update(dict(width=48, depth=2, num_heads=3, mlp_dim=96, patch_size=4))
  config.batch_size, config.eval_batch_size = 64, 96  # 1000 = 10 x 96 + 40: padding.
  config.total_steps, config.log_every_steps, config.eval_every_steps = 200, 10, 100
  config.optim.warmup_steps = 20
  config.aug.crop, config.aug.flip, config.label_smoothing = "none", False, 0.0
  final = train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metric_rows(tmp_path) if "train/loss" in r]
  assert rows[0]["train/loss"] > 2.0 and rows[-1]["train/loss"] < 1.3
  assert final["eval/top1"] > 0.55  # Chance is 0.10; this run (the recipe's stem) reaches 0.68.
  assert final["eval/num_examples"] == 1000  # Every example once, the last batch padded.


def test_rerunning_a_finished_run_with_a_validation_split_logs_nothing_twice(
    fashion_mnist_dirs, tmp_path):
  from vit_jax.configs import fashion_mnist
  from vit_jax import train
  config = fashion_mnist.get_config()
  config.manual_dir, config.data_dir = fashion_mnist_dirs
  config.train_split, config.val_split, config.eval_split = (
      "train[:256]", "train[256:320]", "test[:64]")
  config.model.overrides.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
  config.batch_size = config.eval_batch_size = 64
  config.total_steps, config.optim.warmup_steps = 4, 1
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  final = train.train_and_evaluate(config, str(tmp_path))
  logged = (tmp_path / "metrics.jsonl").read_text()
  assert [r["step"] for r in metric_rows(tmp_path) if "eval/best_step" in r] == [4]
  # The rerun resumes at the last step and evaluates again, as the first run ended.
  assert train.train_and_evaluate(config, str(tmp_path)) == final
  assert (tmp_path / "metrics.jsonl").read_text() == logged


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.01)


def test_resume_after_sigkill_is_bit_exact(fashion_mnist_dirs, tmp_path):
  schedule = ["--config.total_steps=24", "--config.checkpoint_every_steps=4",
              "--config.eval_every_steps=8",
              "--config.aug.randaugment_layers=1", "--config.aug.mixup_alpha=0.2",
              "--config.model.overrides.dropout_rate=0.1", "--config.ema_decay=0.9"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  run(main_command(straight, fashion_mnist_dirs, *schedule))

  proc = subprocess.Popen(main_command(resumed, fashion_mnist_dirs, *schedule), cwd=REPO,
                          env=env_with(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for(resumed / "checkpoints" / "8", proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (resumed / "final_metrics.json").exists()
  out = run(main_command(resumed, fashion_mnist_dirs, *schedule))
  assert "Resuming from" in out.stdout

  a, b = latest_state(straight), latest_state(resumed)  # The EMA weights: what runs deliver.
  assert a.step == b.step == 24
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert metric_rows(straight) == metric_rows(resumed)  # eval_raw/*: the raw weights too.
  assert "eval_raw/top1" in metric_rows(straight)[-1]


def test_checkpoint_restores_on_another_device_count(fashion_mnist_dirs, tmp_path):
  overrides = ["--config.total_steps=6", "--config.checkpoint_every_steps=3",
               "--config.eval_every_steps=6", "--config.ema_decay=0.5"]
  run(main_command(tmp_path, fashion_mnist_dirs, *overrides), devices=8)
  trained = json.load(open(tmp_path / "final_metrics.json"))
  # eval/* scored the EMA, eval_raw/* the raw weights: eval mode must read the EMA.
  assert abs(trained["eval/loss"] - trained["eval_raw/loss"]) > 1e-3
  # Optimiser settings given to eval differ from the run's: eval does not use them.
  out = run(main_command(tmp_path, fashion_mnist_dirs, *overrides, "--config.optim.lr=0.5",
                         "--config.optim.grad_clip_norm=0", mode="eval"), devices=2)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["eval/num_examples"] == 300
  assert result["eval/top1"] == trained["eval/top1"]
  assert abs(result["eval/loss"] - trained["eval/loss"]) < 1e-4
  # Training goes on from the 8-device checkpoint on 4 devices.
  more = run(main_command(tmp_path, fashion_mnist_dirs, "--config.total_steps=9",
                          "--config.checkpoint_every_steps=3", "--config.eval_every_steps=9",
                          "--config.ema_decay=0.5"),
             devices=4)
  assert "Resuming from" in more.stdout
  assert latest_state(tmp_path).step == 9


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(command, cwd=lambda i: REPO, **popen) -> list[subprocess.Popen]:
  """Starts command(i) in cwd(i) as process i of 2 (4 CPU devices each), joined by flags;
  stdout and stderr together as text unless `popen` says otherwise."""
  port = _free_port()
  popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
  return [subprocess.Popen(
      [*command(i), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=cwd(i), env=env_with(4), **popen) for i in range(2)]


def _two_processes(command) -> list[str]:
  """Runs command(i) as process i of 2 (4 CPU devices each); their outputs."""
  procs = start_two_processes(command)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  return outputs


def test_every_process_stops_when_process_0_cannot_prepare_the_data(tmp_path):
  empty = tmp_path / "manual"
  empty.mkdir()
  procs = start_two_processes(
      lambda i: main_command(tmp_path / "run", (str(empty), str(tmp_path / "tfds"))),
      stderr=subprocess.PIPE)
  outputs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [1, 1], outputs
  assert outputs[0][1].splitlines()[-1].startswith(
      f"ERROR: fashion_mnist: config.manual_dir={empty} lacks"), outputs[0]
  assert outputs[1][1].splitlines()[-1] == (
      "ERROR: Process 0 could not prepare fashion_mnist: its error is in its output."), outputs[1]


def test_sigterm_to_one_process_stops_both_at_the_same_step(fashion_mnist_dirs, tmp_path):
  # Through JAX's preemption service (jax.distributed is up): the processes agree on a step.
  procs = start_two_processes(lambda i: main_command(
      tmp_path, fashion_mnist_dirs, "--config.total_steps=400",
      "--config.checkpoint_every_steps=4", "--config.eval_every_steps=400"))
  _wait_for(tmp_path / "checkpoints" / "4", procs[0])
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outputs
  saved = [re.findall(r"^SIGTERM: saved a checkpoint at step (\d+)/400 in ", out, re.M)
           for out in outputs]
  assert saved[0] == saved[1] and len(saved[0]) == 1, outputs
  assert int(saved[0][0]) in [int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                              if p.name.isdigit()]


def test_a_workdir_the_processes_do_not_share_is_refused(fashion_mnist_dirs, tmp_path):
  # Each process given its own folder (a relative path from two other folders): as if
  # each host wrote to its local disk.
  for i in range(2):
    (tmp_path / f"host{i}").mkdir()
  command = [arg.replace("configs/", f"{REPO}/configs/")
             for arg in main_command("run", fashion_mnist_dirs)]
  procs = start_two_processes(lambda i: command, cwd=lambda i: tmp_path / f"host{i}",
                              stderr=subprocess.PIPE)
  outputs = [p.communicate(timeout=600) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 1, err[-2000:]
    assert err.splitlines()[-1] == (  # The workdir as each process made it absolute.
        f"ERROR: --workdir={tmp_path}/host{i}/run is not shared by the 2 processes: process(es) 1 cannot see "
        "the file process 0 wrote there. A multi-host run needs one folder every host sees: "
        "a shared file system (NFS, a mounted bucket) or a gs:// path, given as an absolute "
        "path."), err[-2000:]
  assert not list((tmp_path / "host1").iterdir())  # Nothing written where it was refused.


def test_two_processes_match_one_process(fashion_mnist_dirs, tmp_path):
  overrides = ["--config.total_steps=6", "--config.checkpoint_every_steps=6",
               "--config.eval_every_steps=6"]
  one = tmp_path / "one"
  run(main_command(one, fashion_mnist_dirs, *overrides), devices=8)

  # Two processes on an unprepared data_dir: process 0 prepares it, the other waits.
  two, fresh = tmp_path / "two", (fashion_mnist_dirs[0], str(tmp_path / "tfds"))
  outputs = _two_processes(lambda i: main_command(two, fresh, *overrides))
  assert sum(out.count("Preparing fashion_mnist") for out in outputs) == 1, outputs
  assert "Process 1 of 2 (flags): 4 of 8 devices." in outputs[1]

  rows_one, rows_two = metric_rows(one), metric_rows(two)
  assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
  for r1, r2 in zip(rows_one, rows_two):
    assert r1.keys() == r2.keys()
    for key in r1:
      np.testing.assert_allclose(r2[key], r1[key], rtol=1e-4, atol=1e-5, err_msg=key)
  final = [r for r in rows_two if "eval/num_examples" in r][-1]
  assert final["eval/num_examples"] == 300


# Process i of 2 saves steps 1 and 2 of a small state into one folder, then restores it;
# step 2 fails its checksum on process 1 only (as damage in shards only it reads would).
_RESTORE_WHERE_ONE_PROCESS_FAILS = """
import json, sys
import jax, jax.numpy as jnp
from vit_jax import parallel
from vit_jax.train import checkpoints
flags = dict(a[2:].split("=", 1) for a in sys.argv[2:])
jax.distributed.initialize(flags["coordinator_address"], int(flags["num_processes"]),
                           int(flags["process_id"]))
mesh = parallel.make_mesh()
store = checkpoints.CheckpointStore(sys.argv[1], keep=3)
state = {"w": jax.device_put(jnp.arange(8.0), parallel.replicated(mesh))}
for step in (1, 2):
  store.save(step, jax.tree_util.tree_map(lambda x: x * step, state), {"position": step}, {})
store.close()
real_verify = checkpoints._verify
def verify(restored, expected):
  if jax.process_index() == 1 and float(restored["w"][1]) == 2.0:
    raise ValueError("checksum mismatch")
  real_verify(restored, expected)
checkpoints._verify = verify
restored = checkpoints.CheckpointStore(sys.argv[1], keep=3).restore(
    checkpoints.abstract_with_shardings(state, {"w": parallel.replicated(mesh)}))
print(json.dumps({"step": restored.step, "w1": float(restored.state["w"][1])}))
"""


def test_every_process_restores_the_same_checkpoint(tmp_path):
  outputs = _two_processes(lambda i: [sys.executable, "-c", _RESTORE_WHERE_ONE_PROCESS_FAILS,
                                      str(tmp_path / "checkpoints")])
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  assert results == [{"step": 1, "w1": 1.0}] * 2, outputs
  assert (f"WARNING: checkpoint {tmp_path}/checkpoints/checkpoints/2 is unreadable (on "
          "process(es) 1); falling back to step 1.") in outputs[0]


def test_cpu_steps_compile_with_the_measured_xla_options_where_jaxlib_knows_them(
    monkeypatch):
  assert steps.compiler_options() == {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  # A jaxlib without the option or the value: the probe says no, the steps go without
  # that one and keep the others.
  assert not steps.accepts((("xla_cpu_scheduler_type", "NO_SUCH_SCHEDULER"),))
  assert not steps.accepts((("xla_cpu_no_such_option", "1"),))
  monkeypatch.setitem(steps._CPU_OPTIONS, "xla_cpu_no_such_option", "1")
  assert list(steps.compiler_options()) == ["xla_cpu_scheduler_type",
                                            "xla_cpu_experimental_ynn_fusion_type"]

  # The options take effect: a standalone matmul leaves YNNPACK for Eigen; reductions
  # (LayerNorm's statistics) stay in YNNPACK.
  def in_ynnpack(f, *args, **options) -> bool:
    return "ynn_fusion" in jax.jit(f, **options).lower(*args).compile().as_text()

  x, w = jnp.ones((256, 192)), jnp.ones((192, 576))
  assert in_ynnpack(jnp.matmul, x, w)
  assert not in_ynnpack(jnp.matmul, x, w, compiler_options=steps.compiler_options())
  assert in_ynnpack(lambda x: jnp.sum(x * x, 1), x, compiler_options=steps.compiler_options())


def test_images_per_sec_leaves_out_an_evaluation_between_two_rows(monkeypatch):
  from vit_jax.train import loop
  clock = [100.0]
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: clock[0]))

  def steps_taking(n: int, seconds: float) -> None:
    metrics.unlogged += [{"step": i, "finite": True, "loss": 1.0, "grad_norm": 1.0}
                         for i in range(n)]
    clock[0] += seconds

  metrics = loop._StepMetrics(unlogged=[], since=clock[0])
  steps_taking(10, 5.0)
  with metrics.untimed():  # An evaluation between two rows (eval_every not a multiple of
    clock[0] += 20.0       # log_every): its 20 s are left out, the 10 steps before it kept.
  steps_taking(10, 5.0)
  assert metrics.row(step=20, lr=0.1, batch_size=4)["train/images_per_sec"] == 20 * 4 / 10.0
  # The next row times its own steps only.
  steps_taking(5, 1.0)
  assert metrics.row(step=25, lr=0.1, batch_size=4)["train/images_per_sec"] == 5 * 4 / 1.0
