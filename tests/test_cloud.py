"""A workdir on Google Cloud Storage, for real but offline: a GCS emulator on 127.0.0.1
(the `gcs_emulator` fixture), two processes of four CPU devices each, a SIGKILL, an exact
resume, evaluation, export to gs:// and fine-tuning from it."""
import io
import json
import signal
import subprocess
import time

import jax
import numpy as np
from PIL import Image

from test_train import _two_processes, main_command, start_two_processes
from vit_jax import paths


def _gs_rows(workdir: str) -> list[dict]:
  rows = [json.loads(line) for line in paths.read_text(paths.join(workdir, "metrics.jsonl"))
          .splitlines()]
  return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in rows]


def _params(workdir: str):
  from vit_jax.train import workdir as workdir_lib
  trained = workdir_lib.load_trained(workdir, "latest")
  return trained.step, jax.device_get(trained.params)


def _kill_two_processes_after(command, marker: str, timeout: float = 300) -> None:
  """Starts command(i) as process i of 2 and SIGKILLs both once `marker` exists."""
  procs = start_two_processes(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    gcs_emulator, fashion_mnist_dirs, monkeypatch):
  from vit_jax.tools import evaluate, export, predict
  from vit_jax.train import checkpoints, pretrained
  # Every program compiled by the first run is reused by the second (the default cache
  # keeps only those that took a second or more): the runs' many small jits.
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  schedule = ["--config.total_steps=12", "--config.checkpoint_every_steps=4",
              "--config.eval_every_steps=12", "--config.model.overrides.dropout_rate=0.1"]
  remote = "gs://bucket/run"

  def command(i):
    del i  # The same command for both processes.
    return main_command(remote, fashion_mnist_dirs, *schedule)

  # SIGKILLed once its step-8 checkpoint is complete (orbax's marker on object stores).
  _kill_two_processes_after(command, f"{remote}/checkpoints/8/commit_success.txt")
  assert not paths.exists(f"{remote}/final_metrics.json")
  # What the uninterrupted run computed up to step 8; then, as if the kill had come while
  # step 8 was being saved, its marker goes: the rerun must start at step 4 and recompute.
  straight_8 = checkpoints.read_checkpoint_params(f"{remote}/checkpoints/8")
  straight_rows = [r for r in _gs_rows(remote) if r["step"] <= 8]
  for step in paths.listdir(f"{remote}/checkpoints"):
    if int(step) >= 8:
      paths.remove(f"{remote}/checkpoints/{step}/commit_success.txt")
      # Its arrays too: the step-8 arrays compared below must be the rerun's own.
      paths.rmtree(f"{remote}/checkpoints/{step}/state")
  outputs = _two_processes(command)
  assert f"Resuming from {remote}/checkpoints/4 " in outputs[0], outputs[0][-3000:]
  assert paths.isfile(f"{remote}/checkpoints/8/commit_success.txt")
  resumed_8 = checkpoints.read_checkpoint_params(f"{remote}/checkpoints/8")
  assert resumed_8.keys() == straight_8.keys()
  for name, value in straight_8.items():
    np.testing.assert_array_equal(resumed_8[name], value, err_msg=name)
  rows = _gs_rows(remote)
  assert [r for r in rows if r["step"] <= 8] == straight_rows
  assert rows[-1]["step"] == 12
  assert paths.listdir(f"{remote}/tensorboard")  # Events uploaded.
  assert paths.isfile(f"{remote}/pictures/training_curves.png")

  # Evaluation and export read the gs:// workdir; a fine-tune reads the gs:// .npz.
  result = evaluate.evaluate(_run_config(remote), remote, "latest")
  final = json.loads(paths.read_text(f"{remote}/final_metrics.json"))
  assert result["eval/top1"] == final["eval/top1"] and result["step"] == 12
  assert paths.isfile(f"{remote}/eval_per_class.json")
  npz = "gs://bucket/exported/tiny.npz"
  export.export_workdir(remote, npz, "latest")
  assert paths.listdir("gs://bucket/exported") == ["tiny.npz"]  # No temporary left.
  trained = _run_config(remote)
  with trained.unlocked():
    trained.init_from = npz
  params = _params(remote)[1]
  loaded, report = pretrained.load_params(trained, jax.tree_util.tree_map(np.zeros_like, params))
  assert report.source.startswith(f"{npz} (.npz)") and not report.reinitialised
  for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(x, y)

  # Predict's images from a gs:// folder, decoded as local files are.
  png = io.BytesIO()
  Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(png, "PNG")
  paths.write_bytes_atomic("gs://bucket/images/a.png", png.getvalue())
  files = predict.expand_paths(["gs://bucket/images", "gs://bucket/images/none.png"])
  assert files == ["gs://bucket/images/a.png", "gs://bucket/images/none.png"]
  readable, images, failures = predict.read_images(files, (28, 28, 1))
  assert readable == files[:1] and images.shape == (1, 28, 28, 1)
  assert failures[files[1]].endswith("there is no such file.")


def _run_config(workdir: str):
  """The run's own config, as evaluation would be given it."""
  from vit_jax.train import workdir as workdir_lib
  return workdir_lib.load_config(workdir)
