"""A workdir on Google Cloud Storage, for real but offline: a GCS emulator on 127.0.0.1
(the `gcs_emulator` fixture), two processes of four CPU devices each, a SIGKILL, an exact
resume, evaluation, export to gs:// and fine-tuning from it."""
import json
import signal
import subprocess
import time

import jax
import numpy as np

from test_train import REPO, _free_port, _two_processes, env_with, main_command
from vit_jax import paths


def _gs_rows(workdir: str) -> list[dict]:
  rows = [json.loads(line) for line in paths.read_text(paths.join(workdir, "metrics.jsonl"))
          .splitlines()]
  return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in rows]


def _params(workdir: str):
  from vit_jax.train import workdir as workdir_lib
  trained = workdir_lib.load_trained(workdir, "latest")
  return trained.step, [np.asarray(x) for x in jax.tree_util.tree_leaves(trained.params)]


def _kill_two_processes_after(command, marker: str, timeout: float = 300) -> None:
  """Starts command(i) as process i of 2 and SIGKILLs both once `marker` exists."""
  port = _free_port()
  procs = [subprocess.Popen(
      [*command(i), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, env=env_with(4), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL) for i in range(2)]
  deadline = time.time() + timeout
  try:
    while not paths.exists(marker):
      assert all(p.poll() is None for p in procs), "the run ended before it was killed"
      assert time.time() < deadline, f"{marker} did not appear"
      time.sleep(0.05)
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
      p.wait()


def test_gs_workdir_two_processes_resume_bit_exactly_evaluate_export_and_fine_tune(
    gcs_emulator, fashion_mnist_dirs, tmp_path):
  schedule = ["--config.total_steps=16", "--config.checkpoint_every_steps=4",
              "--config.eval_every_steps=8", "--config.model.overrides.dropout_rate=0.1"]
  straight, remote = tmp_path / "straight", "gs://bucket/run"
  _two_processes(lambda i: main_command(straight, fashion_mnist_dirs, *schedule))

  # Killed once its step-8 checkpoint is complete (orbax's marker on object stores).
  _kill_two_processes_after(lambda i: main_command(remote, fashion_mnist_dirs, *schedule),
                            f"{remote}/checkpoints/8/commit_success.txt")
  assert not paths.exists(f"{remote}/final_metrics.json")
  outputs = _two_processes(lambda i: main_command(remote, fashion_mnist_dirs, *schedule))
  assert f"Resuming from {remote}/checkpoints/" in outputs[0], outputs[0][-3000:]

  (step_a, a), (step_b, b) = _params(str(straight)), _params(remote)
  assert step_a == step_b == 16
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert _gs_rows(str(straight)) == _gs_rows(remote)
  assert paths.listdir(f"{remote}/tensorboard")  # Events uploaded.
  assert paths.isfile(f"{remote}/pictures/training_curves.png")

  # Evaluation and export read the gs:// workdir; a fine-tune starts from the gs:// .npz.
  out = subprocess.run(
      main_command(remote, fashion_mnist_dirs, mode="eval"), cwd=REPO, env=env_with(8),
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  final = json.loads(paths.read_text(f"{remote}/final_metrics.json"))
  assert json.loads(out.stdout.strip().splitlines()[-1])["eval/top1"] == final["eval/top1"]
  assert paths.isfile(f"{remote}/eval_per_class.json")
  npz = "gs://bucket/exported/tiny.npz"
  out = subprocess.run(
      [*main_command(remote, fashion_mnist_dirs, mode="export"), f"--output={npz}"],
      cwd=REPO, env=env_with(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert paths.listdir("gs://bucket/exported") == ["tiny.npz"]  # No temporary left.
  out = subprocess.run(
      main_command(tmp_path / "finetuned", fashion_mnist_dirs, f"--config.init_from={npz}",
                   "--config.total_steps=2", "--config.eval_every_steps=2"),
      cwd=REPO, env=env_with(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Initialised from {npz} (.npz)" in out.stdout, out.stdout[-3000:]
