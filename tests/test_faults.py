"""Faults and bad input: nothing lost, every error clear.

Provoked for real: SIGTERM and SIGINT mid-training, SIGKILL between orbax writing a
checkpoint and renaming it into place, garbled and truncated checkpoint files, NaN
losses, a workdir of another model, config and data mistakes, and fuzzed configs and
image files. Training runs are subprocesses of main.py on a tiny ViT on Fashion-MNIST;
runs share a persistent XLA compilation cache, so only the first of each config compiles.
"""
import io
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from logging import getLogger

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import logging
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image, ImageFile

from vit_jax import cli, config as config_lib, data, errors, models, parallel, train
from vit_jax.data import decode
from vit_jax.models import hub
from vit_jax.tools import evaluate, predict
from vit_jax.train import checkpoints, state as state_lib, workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Orbax leaves its read coroutines unfinished when a damaged checkpoint fails to load;
# Python reports them when they are collected, in whichever test that happens.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
    ":pytest.PytestUnraisableExceptionWarning")

# A 2-block, 32-wide ViT on 1024 training images (as tests/test_train.py).
TINY = ["--config.train_split=train[:1024]", "--config.eval_split=test[:300]",
        "--config.batch_size=64", "--config.eval_batch_size=64",
        "--config.model.overrides.width=32", "--config.model.overrides.depth=2",
        "--config.model.overrides.num_heads=2", "--config.model.overrides.mlp_dim=64",
        "--config.optim.warmup_steps=2"]

# Logging every 3 steps and checkpointing every 4: checkpoints fall between log rows, so
# a resumed run must carry the not-yet-logged step metrics over to write the same rows.
SCHEDULE = ["--config.total_steps=24", "--config.log_every_steps=3",
            "--config.checkpoint_every_steps=4", "--config.eval_every_steps=8"]

# Runs main.py, but SIGKILLs the process when orbax has written every file of the
# checkpoint $VIT_JAX_TEST_KILL_AT (e.g. "checkpoints/8") into its temporary folder and
# is about to rename it into place: the last moment a crash can leave it half-done.
KILL_BEFORE_RENAME = r"""
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
original = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
  final = self.get_final()
  if f"{final.parent.name}/{final.name}" == os.environ["VIT_JAX_TEST_KILL_AT"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await original(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# --- Helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
          "PYTHONUNBUFFERED": "1",
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def main_args(workdir, dirs, *overrides) -> list[str]:
  manual_dir, data_dir = dirs
  return [str(REPO / "main.py"), "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
          f"--config.manual_dir={manual_dir}", f"--config.data_dir={data_dir}", *TINY,
          *overrides]


class Run:
  """A main.py subprocess whose stdout and stderr go to one log file."""

  def __init__(self, args: list[str], env: dict, log: pathlib.Path, python_code=None):
    self.log = log
    cmd = [sys.executable, *(["-c", python_code] if python_code else []), *args]
    with open(log, "w") as out:
      self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)

  def wait_for(self, path: pathlib.Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
      assert self.proc.poll() is None, f"the run ended first:\n{self.output()[-3000:]}"
      assert time.time() < deadline, f"{path} did not appear"
      time.sleep(0.005)

  def finish(self, returncode: int) -> str:
    self.proc.wait(timeout=600)
    text = self.output()
    assert self.proc.returncode == returncode, text[-4000:]
    return text

  def output(self) -> str:
    return self.log.read_text()


def run(args, env, log, returncode=0) -> str:
  return Run(args, env, log).finish(returncode)


def metric_rows(workdir) -> list[dict]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in rows]


def steps_on_disk(workdir, kind="checkpoints") -> list[int]:
  folder = pathlib.Path(workdir) / kind  # Made by the first save of its kind.
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def assert_same_params(a, b) -> None:
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def garble(path: pathlib.Path) -> None:
  """Flips every 64th byte of `path`: enough to reach real data in any layout."""
  raw = bytearray(path.read_bytes())
  for i in range(len(raw) // 2 % 64, len(raw), 64):
    raw[i] ^= 0xFF
  path.write_bytes(bytes(raw))


def data_files(state_folder: pathlib.Path) -> list[pathlib.Path]:
  """Every array-data file of a checkpoint (OCDBT `d/` folders): the largest file alone
  may hold no data that a restore reads."""
  files = [p for p in state_folder.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no data files under {state_folder}"
  return files


def largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --- 1-3: preemption, a crash mid-save and a damaged checkpoint, all resumed exactly ---------


def test_preemption_crash_and_damage_resume_bit_exact(fashion_mnist_dirs, env, tmp_path):
  """One workdir goes through SIGTERM, SIGKILL before a checkpoint's rename, SIGINT and
  a garbled checkpoint, and ends identical to an uninterrupted run."""
  straight, chain = tmp_path / "straight", tmp_path / "chain"
  run(main_args(straight, fashion_mnist_dirs, *SCHEDULE), env, tmp_path / "straight.log")
  want_rows = metric_rows(straight)

  # SIGTERM: the step under way ends, a checkpoint is saved, exit status 128 + 15.
  first = Run(main_args(chain, fashion_mnist_dirs, *SCHEDULE), env, tmp_path / "1.log")
  first.wait_for(chain / "checkpoints" / "4")
  first.proc.send_signal(signal.SIGTERM)
  out = first.finish(143)
  s1 = int(re.search(r"SIGTERM: saved a checkpoint at step (\d+)/24 in (\S+); exiting with "
                     r"status 143\. Rerun the same command to resume\.", out).group(1))
  assert f" in {chain}/checkpoints;" in out
  assert 4 < s1 < 24 and steps_on_disk(chain)[-1] == s1
  assert not (chain / "final_metrics.json").exists()
  assert metric_rows(chain) == [r for r in want_rows if r["step"] <= s1]  # No extra row.

  # SIGKILL after orbax wrote the next checkpoint into its temporary folder, before the
  # rename that makes it count.
  k = (s1 // 4 + 1) * 4
  second = Run(main_args(chain, fashion_mnist_dirs, *SCHEDULE),
               {**env, "VIT_JAX_TEST_KILL_AT": f"checkpoints/{k}"}, tmp_path / "2.log",
               python_code=KILL_BEFORE_RENAME)
  out = second.finish(-signal.SIGKILL)
  assert f"Resuming from {chain}/checkpoints/{s1} (step {s1}/24)." in out
  leftover = chain / "checkpoints" / f"{k}.orbax-checkpoint-tmp"
  assert (leftover / "state" / "_METADATA").is_file()  # Written in full, never renamed.
  assert not (chain / "checkpoints" / str(k)).exists() and steps_on_disk(chain)[-1] == s1

  # SIGINT: the rerun resumes from the last complete checkpoint, not the leftover, which
  # is gone; it stops with status 128 + 2.
  third = Run(main_args(chain, fashion_mnist_dirs, *SCHEDULE), env, tmp_path / "3.log")
  third.wait_for(chain / "checkpoints" / str(k))
  third.proc.send_signal(signal.SIGINT)
  out = third.finish(130)
  assert f"Resuming from {chain}/checkpoints/{s1} (step {s1}/24)." in out
  assert not leftover.exists()
  s3 = int(re.search(r"SIGINT: saved a checkpoint at step (\d+)/24", out).group(1))
  assert k < s3 < 24 and steps_on_disk(chain)[-1] == s3

  # A garbled file in the newest checkpoint: named on the console, and the run falls back
  # to the one before.
  for data_file in data_files(chain / "checkpoints" / str(s3) / "state"):
    garble(data_file)
  previous = steps_on_disk(chain)[-2]
  out = run(main_args(chain, fashion_mnist_dirs, *SCHEDULE), env, tmp_path / "4.log")
  # No "\n" after it: stdout and stderr share the log, and a background thread's stderr
  # can land right after the line.
  assert re.search(rf"WARNING: checkpoint {chain}/checkpoints/{s3} is unreadable \(\w+: .+\); "
                   rf"falling back to step {previous}\.", out), out[-3000:]
  assert f"Resuming from {chain}/checkpoints/{previous} (step {previous}/24)." in out
  # Said once, in one line: orbax's whole error is logged at INFO only.
  assert out.count(f"checkpoints/{s3} is unreadable") == 1, out[-3000:]
  # Reads of the damaged checkpoint still in flight when orbax gave up: not one report.
  for noise in ("Traceback", "Event loop is closed", "never retrieved", "never awaited"):
    assert noise not in out, out[-3000:]

  a, b = train_state(straight), train_state(chain)
  assert a.step == b.step == 24
  assert_same_params(a.params, b.params)
  assert metric_rows(chain) == want_rows
  assert json.loads((chain / "final_metrics.json").read_text()) == \
      json.loads((straight / "final_metrics.json").read_text())
  assert steps_on_disk(chain, "best") == steps_on_disk(straight, "best")


def train_state(workdir, which="latest"):
  return workdir_lib.load_trained(str(workdir), which)


# --- The README's commands as typed: relative paths, a quiet console ------------------------


def test_readme_commands_with_relative_paths(fashion_mnist_dirs, env, tmp_path):
  """Every mode with every path relative to the current folder (tmp_path), as a newcomer
  types the README's commands: the offline build announced in our words and no terminal
  codes or library start-up lines in a log; a fine-tune from a config.init_from that does
  not exist refused before anything is written."""
  manual_dir, _ = fashion_mnist_dirs
  env = {k: v for k, v in env.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # As a user has it.
  common = ["--config=fashion_mnist", "--config.data_dir=tfds", *TINY,
            f"--config.manual_dir={os.path.relpath(manual_dir, tmp_path)}"]
  schedule = ["--config.total_steps=4", "--config.log_every_steps=2",
              "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4"]

  def main(*args, returncode=0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == returncode, out.stdout[-3000:] + out.stderr[-3000:]
    return out

  out = main(*common, *schedule, "--workdir=runs/pre")
  console = out.stdout + out.stderr
  assert (f"Preparing fashion_mnist in {tmp_path}/tfds/fashion_mnist/3.0.1 from manual_dir "
          f"{manual_dir} ...\n") in out.stdout
  assert re.search(r"^Prepared fashion_mnist: 70,000 examples in \d+ s\.$", out.stdout, re.M)
  for noise in ("\x1b[", "\r", "Unknown size", "Downloading and preparing dataset",
                "tensorflow", "oneDNN", "Traceback"):
    assert noise not in console, (noise, console[-3000:])
  assert not re.search(r"^[IWEF]\d{4} ", console, re.M), console[-3000:]  # absl/C++ logs.
  assert steps_on_disk(tmp_path / "runs" / "pre", "best") == [4]

  # Export (the README's command) of the best and of the latest checkpoint.
  out = main("--mode=export", "--workdir=runs/pre", "--output=pre.npz")
  assert out.stdout.splitlines()[-2:] == [
      f"WARNING: timm and vision_transformer will not rebuild this model from "
      f"{tmp_path}/pre.npz: a convolutional stem (stem_features=8): neither has one; inputs "
      "normalised with aug.normalize='dataset' (the training set's mean and std, in "
      "run.json), where the published models take [-1, 1]. vit_jax reads it back as it is "
      "(config.init_from).",
      f"Wrote {tmp_path}/pre.npz from {tmp_path}/runs/pre/best/4."]
  main("--mode=export", "--workdir=runs/pre", "--output=latest.npz", "--checkpoint=latest")
  with np.load(tmp_path / "pre.npz") as best, np.load(tmp_path / "latest.npz") as latest:
    assert sorted(best) == sorted(latest) and "head/kernel" in best

  # A fine-tune from a checkpoint that is not there: one line, into a new workdir and into
  # one with a file of the user's; neither is touched.
  (tmp_path / "runs" / "mine").mkdir()
  (tmp_path / "runs" / "mine" / "notes.txt").write_text("mine")
  before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*"))
  for workdir in ("runs/ft", "runs/mine"):
    out = main(*common, f"--workdir={workdir}", "--config.init_from=runs/nothere",
               returncode=1)
    assert (out.stdout, out.stderr) == ("", f"ERROR: config.init_from="
                                            f"{str(tmp_path / 'runs' / 'nothere')!r} does not "
                                            "exist.\n")
  assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*")) == before

  # The README's fine-tuning recipe, init_from relative.
  out = main(*common, *schedule, "--workdir=runs/ft", "--config.init_from=runs/pre")
  assert f"Initialised from {tmp_path}/runs/pre/best/4 (our checkpoint)" in out.stdout

  # Eval: the JSON line, and per class the counts and the confusion matrix.
  out = main("--mode=eval", *common, "--workdir=runs/pre")
  result = json.loads(out.stdout.splitlines()[-1])
  assert result["per_class"] == f"{tmp_path}/runs/pre/eval_per_class.json"
  assert result["confusion_matrix"] == f"{tmp_path}/runs/pre/pictures/confusion_matrix.png"
  per_class = json.loads((tmp_path / "runs" / "pre" / "eval_per_class.json").read_text())
  matrix = np.asarray(per_class["confusion_matrix"])
  assert matrix.shape == (10, 10) and matrix.sum() == result["eval/num_examples"] == 300
  assert np.trace(matrix) / 300 == result["eval/top1"] == per_class["eval/top1"]
  assert [row["examples"] for row in per_class["per_class"]] == matrix.sum(1).tolist()
  assert [row["correct"] for row in per_class["per_class"]] == np.diag(matrix).tolist()
  assert per_class["per_class"][0]["class"] == "T-shirt/top"
  assert os.path.isfile(result["confusion_matrix"])

  # Predict and visualize an image given relative to the current folder.
  Image.new("L", (28, 28), 200).save(tmp_path / "boot.png")
  out = main("--mode=predict", "--workdir=runs/pre", "--images=boot.png", "--format=json")
  assert json.loads(out.stdout.splitlines()[-1])["image"] == f"{tmp_path}/boot.png"
  main("--mode=visualize", "--workdir=runs/pre", "--images=boot.png")
  pictures = sorted(os.listdir(tmp_path / "runs" / "pre" / "pictures"))
  assert pictures == ["attention_00_boot.png", "confusion_matrix.png", "patches_00_boot.png",
                      "training_curves.png"]


# --- 3: damaged checkpoints, in-process -----------------------------------------------------


def _tiny_state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": jax.numpy.asarray(rng.normal(size=(64, 64)).astype(np.float32)),
          "b": jax.numpy.asarray(rng.normal(size=(64,)).astype(np.float32)),
          "step": jax.numpy.int32(seed)}


def test_damaged_checkpoints_are_named_and_skipped(tmp_path, capsys):
  states = {step: _tiny_state(step) for step in (1, 2, 3)}
  abstract = checkpoints.abstract_with_shardings(
      states[1], jax.tree_util.tree_map(lambda x: x.sharding, states[1]))
  store = checkpoints.CheckpointStore(str(tmp_path), keep=3)
  for step, state in states.items():
    store.save(step, state, {"step": step}, {"note": step})
  folder = tmp_path / "checkpoints"

  # One flipped byte inside compressed array data: orbax decodes it without complaint (no
  # checksums of its own), the checksums saved in meta catch it.
  data_file = largest_file(folder / "3" / "state")
  raw = bytearray(data_file.read_bytes())
  raw[len(raw) // 2] ^= 0x04
  data_file.write_bytes(bytes(raw))
  restored = store.restore(abstract)
  assert restored.step == 2 and restored.meta == {"step": 2, "note": 2}
  assert_same_params(restored.state, states[2])
  assert (f"WARNING: checkpoint {folder}/3 is unreadable (ValueError: 1 array(s) do not "
          "match the checksums saved with them (w): the files were damaged after writing); "
          "falling back to step 2.\n") in capsys.readouterr().out

  # The run saves step 3 again when it gets there: the damaged one is replaced.
  store.save(3, states[3], {"step": 3}, {})
  assert_same_params(store.restore(abstract).state, states[3])

  # Garbled, missing and truncated files: no readable checkpoint at all.
  garble(largest_file(folder / "3" / "state"))
  (folder / "2" / "meta" / "metadata").unlink()
  big = largest_file(folder / "1" / "state")
  big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
  with pytest.raises(errors.UnreadableCheckpointError) as error:
    store.restore(abstract)
  assert str(error.value) == (
      f"No readable checkpoint in {folder} (tried steps 3, 2, 1; the reasons are printed "
      "above). Restore the folder from a backup, or move it away (or pass --start_over, "
      "which deletes the run's checkpoints and logs) to train from scratch.")
  lines = capsys.readouterr().out.splitlines()
  assert re.fullmatch(rf"WARNING: checkpoint {folder}/3 is unreadable \(ValueError: "
                      r"FAILED_PRECONDITION: Error reading .*ZSTD_decompressStream\(\) failed"
                      r".*\); falling back to step 2\.", lines[0]), lines[0]
  assert lines[1] == (f"WARNING: checkpoint {folder}/2 is unreadable (FileNotFoundError: File "
                      f"{folder}/2/meta/metadata not found.); falling back to step 1.")
  assert re.fullmatch(rf"WARNING: checkpoint {folder}/1 is unreadable \(ValueError: \w+: .+\); "
                      r"no older checkpoint to fall back to\.", lines[2]), lines[2]
  store.close()


# --- 4, 5: NaN losses; a workdir of another model; --start_over --------------------------------


def test_abandoned_checkpoint_reads_are_silenced_and_nothing_else(monkeypatch, caplog):
  """After a failed restore, TensorStore finishes the other reads into orbax's closed
  event loop: those reports about the store's folder are dropped, all others kept."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
  monkeypatch.setattr(getLogger("asyncio"), "filters", [])
  checkpoints._silence_abandoned_reads("/runs/a/checkpoints")
  checkpoints._silence_abandoned_reads("/runs/a/checkpoints")  # Idempotent: no chain.
  for error in (RuntimeError("Event loop is closed"), RuntimeError("other"),
                ValueError("Event loop is closed")):
    sys.unraisablehook(types.SimpleNamespace(exc_value=error))
  assert seen == ["other", "Event loop is closed"]
  assert len(getLogger("asyncio").filters) == 1

  caplog.set_level("ERROR", "asyncio")
  for message in (
      "Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
      "'Error reading \"/runs/a/checkpoints/9/state/d/6e89\"')>",
      "Task exception was never retrieved\nfuture: <Task finished exception=ValueError("
      "'Error reading \"/runs/a/checkpoints/9/state/d/6e89\"')>",
      "Task exception was never retrieved\nfuture: <Task finished exception=ValueError("
      "'/runs/b/checkpoints/9')>",
      "Exception in callback for /runs/a/checkpoints/9"):
    getLogger("asyncio").error(message)
  assert [r.getMessage() for r in caplog.records] == [
      "Task exception was never retrieved\nfuture: <Task finished exception=ValueError("
      "'/runs/b/checkpoints/9')>", "Exception in callback for /runs/a/checkpoints/9"]

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    checkpoints._silence_abandoned_reads("/runs/a/checkpoints")
    warnings.warn("coroutine 'Store._get_array_metadatas' was never awaited", RuntimeWarning)
    warnings.warn("coroutine 'mine' was never awaited", RuntimeWarning)
  assert [str(w.message) for w in caught] == ["coroutine 'mine' was never awaited"]


def test_nonfinite_advice_names_only_what_a_resume_accepts():
  def state_structure(**optim_settings):
    config = config_lib.get_base_config()
    config.total_steps = 10
    config.optim.update(optim_settings)
    params = {"head": {"kernel": np.zeros((2, 2), np.float32)}}
    return jax.tree_util.tree_structure(train.optim.make_optimizer(config, params).init(params))

  clipped = state_structure(grad_clip_norm=1.0, lr=1e-3)
  assert state_structure(grad_clip_norm=0.5, lr=1e-4) == clipped  # Resumable changes.
  assert state_structure(grad_clip_norm=0.0, lr=1e-3) != clipped  # Clipping on/off: not.
  config = config_lib.get_base_config()
  config.optim.grad_clip_norm = 0.0
  assert train.loop.nonfinite_advice(config) == (
      "Lower config.optim.lr and rerun, or set config.on_nonfinite='skip' to skip such "
      "steps. Gradient clipping (config.optim.grad_clip_norm) changes the optimiser state: "
      "to turn it on, start over (--start_over) or use another --workdir.")


def test_nonfinite_stop_workdir_mismatch_and_start_over_with_skip(fashion_mnist_dirs, env,
                                                                  tmp_path):
  workdir = tmp_path / "run"
  nan_run = ["--config.optim.lr=1e30", "--config.total_steps=8", "--config.log_every_steps=2",
             "--config.checkpoint_every_steps=2", "--config.eval_every_steps=8"]
  # lr 1e30: step 1 (warmup, lr 0) and step 2 stay finite, step 3's loss is NaN. A
  # checkpoint every step and no log row before step 4: the save's own check must stop it.
  first = [*nan_run[:2], "--config.log_every_steps=4", "--config.checkpoint_every_steps=1",
           "--config.eval_every_steps=8"]
  out = run(main_args(workdir, fashion_mnist_dirs, *first), env, tmp_path / "nan.log", 1)
  assert ("ERROR: Non-finite loss or gradient at step 3: its "
          "update was not applied and the run stopped (config.on_nonfinite='stop'). The "
          f"newest checkpoint is {workdir}/checkpoints/2 (step 2); a rerun resumes from it. "
          "Lower config.optim.lr or config.optim.grad_clip_norm and rerun, or set "
          "config.on_nonfinite='skip' to skip such steps.\n") in out
  assert steps_on_disk(workdir) == [1, 2] and steps_on_disk(workdir, "best") == []
  good = train_state(workdir)
  assert good.step == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(good.params))
  assert not (workdir / "metrics.jsonl").exists() or metric_rows(workdir) == []

  # Another model in the same workdir is refused, and nothing in it changes.
  other = [*nan_run, "--config.model.name=ViT-S/4"]
  before = (workdir / "config.json").read_text()
  out = run(main_args(workdir, fashion_mnist_dirs, *other), env, tmp_path / "other.log", 1)
  assert ("ERROR: Workdir "
          f"{workdir} holds a run of a different model or dataset (model.name: 'ViT-Ti/4' -> "
          "'ViT-S/4'). Use another --workdir, or pass --start_over to delete its checkpoints "
          "and train from scratch.\n") in out
  assert (workdir / "config.json").read_text() == before and steps_on_disk(workdir) == [1, 2]

  # A changed setting the train state depends on (no clipping: one optimiser stage fewer)
  # is named as such, not reported as damage; the checkpoint and config.json stay.
  out = run(main_args(workdir, fashion_mnist_dirs, *first, "--config.optim.grad_clip_norm=0"),
            env, tmp_path / "changed.log", 1)
  assert (f"ERROR: Checkpoint {workdir}/checkpoints/2 is intact but holds another train "
          "state than this config builds (") in out, out[-3000:]
  assert out.endswith("Settings changed since the run's config.json: optim.grad_clip_norm: "
                      "1.0 -> 0.0.\n"), out[-3000:]
  assert "unreadable" not in out
  assert (workdir / "config.json").read_text() == before and steps_on_disk(workdir) == [1, 2]

  # --start_over trains from scratch; on_nonfinite="skip" goes past the NaN steps (the
  # same architecture under another name: every step from 3 on is non-finite again).
  out = run(main_args(workdir, fashion_mnist_dirs, *other, "--start_over",
                      "--config.on_nonfinite=skip"), env, tmp_path / "skip.log")
  assert "Resuming" not in out
  assert ("WARNING: skipped 2 step(s) with a non-finite loss or gradient (steps 3, 4).\n"
          in out)
  assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "ViT-S/4"
  rows = [r for r in metric_rows(workdir) if "train/loss" in r]
  assert [(r["step"], r.get("train/skipped_steps")) for r in rows] == \
      [(2, None), (4, 2), (6, 2), (8, 2)]
  assert rows[1]["train/loss"] == "nan"  # No finite step to average.
  skipped = train_state(workdir)
  assert skipped.step == 8 and steps_on_disk(workdir) == [4, 6, 8]
  assert_same_params(skipped.params, good.params)  # No bad update was ever applied.


def test_changed_settings_name_real_changes_only(tmp_path):
  config = base_config()
  assert workdir_lib.changed_settings(str(tmp_path), config) == (
      "The workdir has no config.json to compare the settings with.")
  saved = json.loads(config.to_json_best_effort())
  del saved["optim"]["warmup_epochs"]  # A key vit_jax added after this run was written.
  saved["optim"]["lr"], saved["model"]["name"] = 0.5, "ViT-S/4"
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert workdir_lib.changed_settings(str(tmp_path), config) == (
      "Settings changed since the run's config.json: model.name: 'ViT-S/4' -> 'ViT-Ti/4'; "
      "optim.lr: 0.5 -> 0.001.")
  assert workdir_lib.changed_settings(str(tmp_path), config, ("model.",)) == (
      "Settings changed since the run's config.json: model.name: 'ViT-S/4' -> 'ViT-Ti/4'.")


# --- 6: config mistakes ------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
  return config_lib.get_base_config()


def set_key(config, dotted: str, value) -> None:
  *parents, last = dotted.split(".")
  for part in parents:
    config = config[part]
  setattr(config, last, value)


@pytest.mark.parametrize("key,value,message", [
    ("model.name", "ViT-X/9", "config.model.name='ViT-X/9' is not a registered model: use "
     f"one of {models.list_models()}."),
    ("batch_size", 0, "config.batch_size=0 is not allowed: use an integer >= 1."),
    ("total_steps", -5, "config.total_steps=-5 is not allowed: use an integer >= 0 (0 = "
     "from config.num_epochs)."),
    ("num_epochs", -1.0, "config.num_epochs=-1.0 is not allowed: use a finite number >= 0."),
    ("optim.lr", math.nan, "config.optim.lr=nan is not allowed: use a finite number >= 0."),
    ("optim.lr", math.inf, "config.optim.lr=inf is not allowed: use a finite number >= 0."),
    ("optim.lr", -0.1, "config.optim.lr=-0.1 is not allowed: use a finite number >= 0."),
    ("optim.name", "lamb", "config.optim.name='lamb' is not allowed: use one of ('adamw', "
     "'sgd')."),
    ("optim.b2", 1.0, "config.optim.b2=1.0 is not allowed: use a number in [0, 1)."),
    ("aug.eval_crop_fraction", 0.0, "config.aug.eval_crop_fraction=0.0 is not allowed: use "
     "a number in (0, 1]."),
    ("label_smoothing", 1.0, "config.label_smoothing=1.0 is not allowed: use a number in "
     "[0, 1)."),
    ("image_size", 30, "config.image_size=30 is not divisible by the patch size 4 of "
     "ViT-Ti/4: use a multiple of 4, e.g. 28."),
    ("aug.crop_scale", (0.9, 0.1), "config.aug.crop_scale=(0.9, 0.1) is not allowed: use "
     "(low, high) with 0 < low <= high <= 1."),
    ("model.overrides.depth", 0, "config.model.overrides.depth=0 is not allowed: use an "
     "integer >= 1."),
    ("model.overrides.dropout_rate", 1.5, "config.model.overrides.dropout_rate=1.5 is not "
     "allowed: use a number in [0, 1)."),
    ("model.overrides.pool", "max", "config.model.overrides.pool='max' is not allowed: use "
     "one of ('token', 'gap', 'map', 'flatten')."),
    ("model.overrides.posemb", "rope", "config.model.overrides.posemb='rope' is not allowed: "
     "use one of ('learned', 'sincos2d')."),
    ("model.overrides.num_registers", -1, "config.model.overrides.num_registers=-1 is not "
     "allowed: use an integer >= 0."),
    ("init_from", "augreg:ViT-Q/16", "config.init_from='augreg:ViT-Q/16' is not a known "
     f"checkpoint name: use one of {', '.join(hub.CHECKPOINTS)}, a URL or a path."),
    ("model.overrides.head_hidden_dims", (64, -1), "config.model.overrides.head_hidden_dims="
     "(64, -1) is not allowed: use a tuple of integers >= 1, e.g. (512,) or ()."),
    ("seed", -1, "config.seed=-1 is not allowed: use an integer in [0, 4294967295]."),
    ("compute_dtype", "float16", "config.compute_dtype='float16' is not allowed: float16 "
     "training needs dynamic loss scaling, which vit_jax does not do; use 'bfloat16' "
     "(float32's range, the same speed on current GPUs and TPUs) or 'float32'."),
    ("optim.mu_dtype", "float16", "config.optim.mu_dtype='float16' is not allowed: use one "
     "of ('float32', 'bfloat16')."),
    ("kernels", "cudnn", "config.kernels='cudnn' cannot run ViT-Ti/4: it needs bfloat16 or "
     "float16 compute (got float32). Use config.kernels='auto'."),
    ("kernels", "tpu", "config.kernels='tpu' is not allowed: use one of ('auto', 'cpu', "
     "'xla', 'cudnn')."),
])
def test_config_error_names_key_value_and_allowed(key, value, message):
  config = base_config()
  set_key(config, key, value)
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value) == message


def test_config_errors_that_involve_two_keys():
  config = base_config()
  config.total_steps, config.num_epochs = 0, 0.0
  with pytest.raises(errors.ConfigError, match=r"^config.total_steps=0 and "
                     r"config.num_epochs=0: set one of them > 0\.$"):
    config_lib.validate(config)
  config = base_config()
  config.model.overrides.class_token = False
  with pytest.raises(errors.ConfigError, match=r"^config.model.overrides.pool='token' "
                     "needs class_token=True"):
    config_lib.validate(config)
  config = base_config()
  config.model.overrides.posemb, config.model.overrides.width = "sincos2d", 4
  with pytest.raises(errors.ConfigError, match=r"^config.model.overrides.posemb='sincos2d' "
                     r"needs a width that is a multiple of 4 and >= 8, not 4\.$"):
    config_lib.validate(config)
  config = base_config()
  config.optim.warmup_steps, config.optim.warmup_epochs = 100, 2.0
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value) == ("config.optim.warmup_steps=100 and config.optim.warmup_epochs="
                              "2.0: set one of them, the other to 0.")


def test_shipped_configs_are_valid():
  from vit_jax.configs import cifar100, fashion_mnist, finetune
  for config in (base_config(), cifar100.get_config(), cifar100.get_config("keras"),
                 fashion_mnist.get_config(), fashion_mnist.get_config("keras"),
                 fashion_mnist.get_config("best"),
                 finetune.get_config("dataset=cifar100,model=ViT-B/16,init=/c/B_16.npz")):
    config_lib.validate(config)


@pytest.fixture
def no_compute(monkeypatch):
  """Mesh, data, checkpoints: touching any of them fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError("reached compute or data before the config was checked")

  for module, name in ((data, "load_source"), (parallel, "make_mesh"),
                       (workdir_lib, "load_trained")):
    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("key,value", [("optim.lr", math.inf), ("model.name", "ViT-Q/4"),
                                       ("image_size", 30), ("total_steps", -1)])
def test_config_checked_before_anything_else(no_compute, tmp_path, key, value):
  config = base_config()
  set_key(config, key, value)
  with pytest.raises(errors.ConfigError, match=rf"^config\.{re.escape(key)}="):
    train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(errors.ConfigError, match=rf"^config\.{re.escape(key)}="):
    evaluate.evaluate(config, str(tmp_path))
  assert not any(tmp_path.iterdir())


def test_batch_size_that_does_not_divide_over_devices(monkeypatch, tmp_path):
  monkeypatch.setattr(data, "load_source", lambda *a: pytest.fail("data loaded first"))
  config = base_config()
  config.batch_size = 12
  with pytest.raises(errors.ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert str(error.value) == ("config.batch_size=12 does not divide evenly over 8 devices "
                              "(1 process(es) x 8 local): use a multiple of 8, e.g. 8 or 16.")


@pytest.mark.parametrize("flag,message", [
    ("--config.nonexistent=1", "--config.nonexistent=1: the config has no key "
     "'nonexistent'. Every key, with its default, is in vit_jax/config.py."),
    ("--config.optim.nme=sgd", "--config.optim.nme=sgd: the config has no key 'nme'. Did "
     'you mean "name"? Every key, with its default, is in vit_jax/config.py.'),
    ("--config.optim.lr=abc", "flag --config.optim.lr=abc: could not convert string to "
     "float: 'abc'"),
    ("--config.model.overrides.depth=2.5", "flag --config.model.overrides.depth=2.5: "
     "invalid literal for int() with base 10: '2.5'"),
])
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags.
def test_command_line_config_mistakes(flag, message, capsys):
  from absl import flags
  from ml_collections import config_flags
  argv = ["main.py", f"--config={REPO / 'configs' / 'fashion_mnist.py'}", flag]
  flag_values = flags.FlagValues()  # As main.py defines it, apart from the global flags.
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  with pytest.raises(SystemExit) as exit_:
    cli.parse_flags(argv, flag_values)
  assert exit_.value.code == 1
  assert capsys.readouterr().err == f"ERROR: {message}\n"


# --- 7: data mistakes ----------------------------------------------------------------------


def test_data_mistakes_print_one_error_line_from_main(tmp_path):
  out = subprocess.run(
      [sys.executable, str(REPO / "main.py"), "--config=configs/cifar100.py",
       "--config.dataset=cifar1000", f"--config.data_dir={tmp_path}",
       f"--workdir={tmp_path / 'w'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  assert out.stderr.splitlines()[-1].startswith(
      "ERROR: Unknown dataset 'cifar1000'. Did you mean: cifar100, cifar10"), out.stderr


@pytest.mark.parametrize("args,message", [
    (["--mode=eval", "--config=configs/cifar100.py"],
     "{w}/config.json not found: {w} is not a vit_jax training workdir (train into it with "
     "main.py --mode=train first)."),
    (["--config=configs/cifar100.py", "--config.batch_size=3"],
     "config.batch_size=3 does not divide evenly over 2 devices (1 process(es) x 2 local): "
     "use a multiple of 2, e.g. 2 or 4."),
    (["--mode=export", "--output=x.npz"],
     "{w} holds no checkpoint: expected a workdir with best/<step> or checkpoints/<step>, a "
     "step folder with state/, or a published-format .npz file."),
])
def test_workdir_and_batch_mistakes_print_one_error_line_from_main(tmp_path, args, message):
  workdir = tmp_path / "w"
  workdir.mkdir()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  # Each stops before any data is read.
  out = subprocess.run([sys.executable, str(REPO / "main.py"), f"--workdir={workdir}", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert (out.returncode, out.stderr.splitlines()[-1]) == (
      1, "ERROR: " + message.format(w=workdir)), out.stderr[-3000:]
  assert "Traceback" not in out.stderr


def _recipes() -> str:
  return "cifar10, cifar100, fashion_mnist, finetune, imagenet"


@pytest.mark.parametrize("args,message", [
    (["--config=configs/cifar1000.py", "--workdir={t}/w"],
     f"--config=configs/cifar1000.py: there is no file configs/cifar1000.py (from {REPO}). "
     f"Did you mean cifar100? The recipes: {_recipes()}, by name (--config=NAME) or as a "
     "path to the file."),
    (["--config=fashion_mnsit", "--workdir={t}/w"],
     "--config=fashion_mnsit: no recipe 'fashion_mnsit'. Did you mean fashion_mnist? Use "
     f"one of {_recipes()}, or a path to a recipe file."),
    (["--mode=eval", "--workdir={t}/w"],
     f"--mode=eval needs --config=NAME (one of {_recipes()}) or --config=PATH/TO/RECIPE.py."),
    (["--mode=export", "--workdir={t}/w"],
     "--mode=export needs --output=PATH.npz (the file to write)."),
    (["--mode=predict", "--images=a.png"], "--mode=predict needs --workdir=DIR."),
    # A flag the mode would ignore is refused, naming the modes that read it.
    (["--mode=predict", "--workdir={t}/w", "--images=a.png", "--config=fashion_mnist",
      "--config.aug.eval_flip=False"],
     "--mode=predict does not use --config: it reads the run's own settings (the workdir's "
     "config.json)."),
    (["--mode=bench", "--config=fashion_mnist", "--workdir={t}/w", "--images=a.png",
      "--checkpoint=latest"],
     "--mode=bench does not use --workdir: it writes nothing; --mode=bench does not use "
     "--checkpoint (a flag of --mode=eval, predict, visualize and export); --mode=bench "
     "does not use --images (a flag of --mode=predict and visualize)."),
    (["--config=fashion_mnist", "--workdir={t}/w", "--output=x.npz", "--format=json"],
     "--mode=train does not use --format (a flag of --mode=predict); --mode=train does not "
     "use --output (a flag of --mode=export)."),
    (["--config=fashion_mnist", "--workdir={t}/w", "train"],
     "Unexpected arguments train: every setting is a flag, e.g. --workdir=DIR (main.py "
     "--helpshort lists them)."),
    (["--config=fashion_mnist:big", "--workdir={t}/w"],
     f"flag --config={REPO}/configs/fashion_mnist.py:big: Error whilst parsing config "
     "file: ValueError: Unknown argument 'big' for configs/fashion_mnist.py: use '', "
     "'best' or 'keras'."),
    (["--config=fashion_mnist", "--workdir={t}/a_file"],
     "Workdir {t}/a_file is a file, not a folder: pass a folder (a new one is created) as "
     "--workdir."),
    (["--mode=predict", "--workdir={t}/run", "--images={t}/boot.jpg"],
     "Cannot read image {t}/boot.jpg: there is no such file."),
    # A checkpoint name is not made a path against the current folder.
    (["--config=fashion_mnist", "--workdir={t}/w", "--config.init_from=augreg:ViT-Q/16"],
     "config.init_from='augreg:ViT-Q/16' is not a known checkpoint name: use one of "
     f"{', '.join(hub.CHECKPOINTS)}, a URL or a path."),
])
def test_newcomer_mistakes_are_one_line_from_main(tmp_path, args, message):
  """Each mistake of a first hour with the README: exactly one line on the console, exit
  status 1, nothing written."""
  (tmp_path / "a_file").write_text("notes")
  config = base_config()  # A workdir with a run's files but no checkpoint.
  (tmp_path / "run").mkdir()
  workdir_lib.write_run_files(str(tmp_path / "run"), config, class_names=["a", "b"],
                              image_shape=(8, 8, 1), mean_C=np.zeros(1), std_C=np.ones(1))
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  out = subprocess.run(
      [sys.executable, str(REPO / "main.py"), *[a.format(t=tmp_path) for a in args]],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
  assert (out.returncode, out.stdout, out.stderr) == (
      1, "", f"ERROR: {message.format(t=tmp_path)}\n")
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_console_quiet_unless_verbosity_is_given():
  code = ("import os, sys; from absl import flags, logging; from vit_jax import cli; "
          "flags.FLAGS(['main.py', *sys.argv[1:]]); cli._quiet_console(); "
          "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), logging.get_verbosity())")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}

  def quiet(*flags) -> str:
    return subprocess.run([sys.executable, "-c", code, *flags], capture_output=True,
                          text=True, check=True, env=env).stdout.strip()

  assert quiet() == f"2 {logging.ERROR}"  # TF_CPP_MIN_LOG_LEVEL=2: errors only.
  # As jax leaves it when it is imported (1: no INFO), and every Python log from INFO up.
  assert quiet("--verbosity=0") == f"1 {logging.INFO}"


def save(image: Image.Image, path: pathlib.Path, **kwargs) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)
  return path


def test_image_modes_decode_to_the_right_channels(tmp_path):
  folder = tmp_path / "train"
  rgba = save(Image.new("RGBA", (12, 9), (10, 200, 30, 0)), folder / "a" / "rgba.png")
  palette = Image.new("P", (12, 9), 1)
  palette.putpalette([0, 0, 0, 250, 100, 5] + [0] * 762)
  pal = save(palette, folder / "a" / "palette.png", transparency=0)
  cmyk = save(Image.new("RGB", (16, 16), (200, 40, 40)).convert("CMYK"),
              folder / "a" / "cmyk.jpg", quality=95)
  wide = np.full((10, 10), 60000, np.uint16)
  wide[0, 0] = 0
  sixteen = save(Image.fromarray(wide), folder / "b" / "sixteen.png")
  assert Image.open(sixteen).mode == "I;16"
  la = save(Image.new("LA", (8, 8), (77, 0)), folder / "b" / "la.png")
  bilevel = save(Image.new("1", (8, 8), 1), folder / "b" / "bilevel.png")

  read = lambda path: decode.decode_file(path, 8)  # noqa: E731
  np.testing.assert_array_equal(read(rgba), np.full((8, 8, 3), (10, 200, 30)))
  np.testing.assert_array_equal(read(pal), np.full((8, 8, 3), (250, 100, 5)))
  np.testing.assert_allclose(read(cmyk).reshape(-1, 3).mean(0), (200, 40, 40), atol=4)
  # 16 bits scaled, not clipped: 60000 -> 233 (PIL's convert("L") would give 255).
  assert read(sixteen).shape == (8, 8, 1) and read(sixteen)[4, 4, 0] == 233
  assert decode.decode_file(sixteen, 10)[0, 0, 0] == 0
  np.testing.assert_array_equal(read(la), np.full((8, 8, 1), 77))
  np.testing.assert_array_equal(read(bilevel), np.full((8, 8, 1), 255))

  config = config_lib.get_base_config()
  config.dataset, config.data_dir, config.image_size = "folder", str(tmp_path), 8
  source = data.load_source(config, "train")
  assert source.image_shape == (8, 8, 3) and len(source) == 6  # Mixed: RGB throughout.
  assert source.class_names == ["a", "b"]
  examples = source.get(np.arange(6))
  gray = examples["image"][examples["label"] == 1]
  assert (gray[..., 0] == gray[..., 1]).all() and sorted(gray[:, 4, 4, 0]) == [77, 233, 255]


def test_grayscale_only_modes_stay_one_channel(tmp_path):
  save(Image.fromarray(np.full((5, 7), 30000, np.uint16)), tmp_path / "train" / "x" / "a.png")
  save(Image.new("LA", (6, 6), (10, 255)), tmp_path / "train" / "y" / "b.png")
  config = config_lib.get_base_config()
  config.dataset, config.data_dir, config.image_size = "folder", str(tmp_path), 4
  source = data.load_source(config, "train")
  assert source.image_shape == (4, 4, 1)
  assert sorted(source.get(np.arange(2))["image"][:, 0, 0, 0]) == [10, 117]


def test_class_folders_without_images(tmp_path):
  save(Image.new("RGB", (4, 4)), tmp_path / "train" / "cat" / "0.png")
  save(Image.new("RGB", (4, 4)), tmp_path / "test" / "cat" / "0.png")
  junk = tmp_path / "test" / "dog"
  junk.mkdir(parents=True)
  (junk / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  (junk / "readme.txt").write_text("no images here")
  save(Image.new("RGB", (4, 4)), tmp_path / "train" / "dog" / "0.png")
  config = config_lib.get_base_config()
  config.dataset, config.data_dir = "folder", str(tmp_path)
  with pytest.raises(ValueError) as error:
    data.load_source(config, "test")
  assert str(error.value) == (f"Class folder {junk} has no images (.jpg/.jpeg/.png): add "
                              "some or remove the folder.")


@pytest.mark.parametrize("kind", ["truncated_jpeg", "empty_png", "png_named_jpg_cut"])
def test_broken_image_files_are_named(tmp_path, kind):
  rng = np.random.default_rng(0)
  pixels = Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8))
  buffer = io.BytesIO()
  pixels.save(buffer, "JPEG" if kind == "truncated_jpeg" else "PNG")
  raw = buffer.getvalue()
  path = tmp_path / {"truncated_jpeg": "a.jpg", "empty_png": "b.png",
                     "png_named_jpg_cut": "c.jpg"}[kind]
  path.write_bytes({"truncated_jpeg": raw[:len(raw) * 2 // 3], "empty_png": b"",
                    "png_named_jpg_cut": raw[:100]}[kind])
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Nothing imported turned it on.
  with pytest.raises(ValueError, match=rf"^Cannot read image {re.escape(str(path))}: .+\. "
                     r"Replace or remove the file\.$"):
    decode.decode_file(path, 8)


def test_a_missing_image_file_is_said_to_be_missing(tmp_path):
  with pytest.raises(errors.DataError) as error:
    decode.decode_file(tmp_path / "boot.jpg", 8)
  assert str(error.value) == f"Cannot read image {tmp_path / 'boot.jpg'}: there is no such file."


def test_a_file_that_is_no_image_is_named_without_reader_internals(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("shopping list")
  with pytest.raises(errors.DataError) as error:
    decode.decode_file(path, 8)
  assert str(error.value) == (f"Cannot read image {path}: cannot identify image file. "
                              "Replace or remove the file.")


def test_a_folder_named_like_an_image_is_refused_in_one_line(tmp_path):
  folder = tmp_path / "boot.jpg"
  folder.mkdir()
  for read in (lambda: decode.decode_file(folder, 8), lambda: decode.read_image_bytes(str(folder))):
    with pytest.raises(errors.DataError) as error:
      read()
    assert str(error.value) == (f"Cannot read image {folder}: [Errno 21] Is a directory: "
                                f"'{folder}'. Replace or remove the file.")


def test_labels_outside_the_classes_name_split_and_values():
  images = np.zeros((14, 4, 4, 1), np.uint8)
  labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, -1, 12])
  with pytest.raises(ValueError) as error:
    data.ArraySource(images, labels, class_names=list("abcdefghij"), name="mine",
                     split="train[:14]")
  assert str(error.value) == (
      "mine:train[:14]: 4 label(s) outside 0..9 (there are 10 class names): -1, 10, 12; the "
      "first at example 10. Check the labels or the list of class names.")
  with pytest.raises(ValueError, match=r"^arrays:train: labels must be class indices of "
                     r"shape \[N\], got shape \(14, 10\) \(one-hot"):
    data.ArraySource(images, np.eye(10)[labels % 10], class_names=list("abcdefghij"))
  with pytest.raises(ValueError, match=r"^arrays:train: labels must be whole numbers \(class "
                     r"indices\), got float64 values such as 1\.5\.$"):
    data.ArraySource(images, np.where(labels == 1, 1.5, 0.0), class_names=list("ab"))


def test_tfds_labels_outside_the_classes(tmp_path):
  import tensorflow as tf

  def as_dataset(self, *args, **kwargs):
    return tf.data.Dataset.from_tensor_slices({
        "image": np.zeros((6, 32, 32, 3), np.uint8),
        "label": np.array([0, 3, 10, 9, 11, 1], np.int64)})

  config = config_lib.get_base_config()
  config.dataset, config.data_dir = "cifar10", str(tmp_path)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    with pytest.raises(ValueError) as error:
      data.load_source(config, "train")
  assert str(error.value) == (
      "cifar10:train: 2 label(s) outside 0..9 (there are 10 class names): 10, 11; the first "
      "at example 2. Check the labels or the list of class names.")


# --- 8: fuzzing ---------------------------------------------------------------------------------

_FUZZ_KEYS = {
    # key: values of the right type, in and out of range.
    "batch_size": st.integers(-4, 64), "total_steps": st.integers(-3, 100),
    "image_size": st.integers(-2, 40), "seed": st.integers(-2, 2**33),
    "log_every_steps": st.integers(-1, 5), "optim.warmup_steps": st.integers(-2, 5),
    "optim.accum_steps": st.integers(-1, 4),
    "optim.lr": st.floats(allow_nan=True, allow_infinity=True),
    "optim.b2": st.floats(-1, 2), "label_smoothing": st.floats(-1, 2),
    "num_epochs": st.floats(allow_nan=True, allow_infinity=True),
    "aug.crop_scale": st.tuples(st.floats(-1, 2), st.floats(-1, 2)),
    "aug.zoom": st.floats(-1, 2), "aug.mix_prob": st.floats(-1, 2),
    "optim.name": st.sampled_from(["adamw", "sgd", "lamb", ""]),
    "model.name": st.sampled_from(["ViT-Ti/4", "ViT-S/16", "ViT-Z/4", "keras-example", ""]),
    "compute_dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
    "model.overrides.patch_size": st.none() | st.integers(-1, 8),
    "model.overrides.width": st.none() | st.integers(-1, 24),
    "model.overrides.depth": st.none() | st.integers(-1, 2),
    "model.overrides.num_heads": st.none() | st.integers(-1, 4),
    "model.overrides.mlp_dim": st.none() | st.integers(-1, 24),
    "model.overrides.head_dim": st.none() | st.integers(-1, 8),
    "model.overrides.dropout_rate": st.none() | st.floats(-1, 2),
    "model.overrides.pool": st.none() | st.sampled_from(["token", "gap", "map", "flatten",
                                                          "max"]),
    "model.overrides.posemb": st.none() | st.sampled_from(["learned", "sincos2d", "rope"]),
    "model.overrides.num_registers": st.none() | st.integers(-1, 2),
    "model.overrides.class_token": st.none() | st.booleans(),
    "model.overrides.head_hidden_dims": st.none() | st.tuples(st.integers(-1, 8)),
    "model.overrides.representation_size": st.none() | st.integers(-1, 8),
}
_WRONG_TYPES = st.one_of(st.text(max_size=4), st.booleans(), st.none(),
                         st.floats(allow_nan=True), st.integers(-10, 10), st.just((1, 2)))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(sorted(_FUZZ_KEYS)), st.none(), min_size=1, max_size=6)
       .flatmap(lambda keys: st.fixed_dictionaries(
           {k: st.one_of(_FUZZ_KEYS[k], _WRONG_TYPES) for k in keys})))
def test_fuzzed_configs_fail_only_with_config_errors(overrides):
  config = base_config()
  config.model.overrides.update(dict(width=16, depth=1, num_heads=2, mlp_dim=16))
  config.image_size = 16
  for key, value in overrides.items():
    try:
      set_key(config, key, value)
    except TypeError as e:  # ml_collections: the key's type does not fit the value.
      assert str(e).startswith(f"Could not override field '{key.split('.')[-1]}'")
  try:
    config_lib.validate(config)
  except errors.ConfigError as e:
    assert str(e).startswith("config.")
    event("refused by validate")
    return
  event("accepted")
  # Accepted: the model builds and initialises (shapes only), whatever the values.
  model = state_lib.build_model(config, num_classes=10)
  shapes = jax.eval_shape(lambda: state_lib.init_params(
      model, config.seed, (config.image_size, config.image_size, 3)))
  assert shapes["head"]["kernel"].shape[-1] == 10


_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "CMYK"]
_FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
            "JPEG": ("L", "RGB", "CMYK"), "GIF": ("L", "P"), "BMP": ("1", "L", "P", "RGB"),
            "TIFF": tuple(_MODES), "WEBP": ("RGB", "RGBA")}


@st.composite
def image_files(draw) -> tuple[bytes, str]:
  """(file bytes, file name): an image of any mode/size/format, cut or corrupted, or noise."""
  name = draw(st.sampled_from(["x.png", "x.jpg", "x.jpeg", "x.PNG"]))
  if draw(st.booleans()):
    prefix = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0"]))
    return prefix + draw(st.binary(max_size=300)), name
  fmt = draw(st.sampled_from(sorted(_FORMATS)))
  mode = draw(st.sampled_from(_FORMATS[fmt]))
  size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  image = Image.new(mode, size)
  if mode in ("I;16", "I"):
    image = Image.fromarray(rng.integers(0, 65536, size[::-1]).astype(
        np.uint16 if mode == "I;16" else np.int32))
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  raw = buffer.getvalue()
  cut = draw(st.sampled_from(["whole", "cut", "flip"]))
  if cut == "cut":
    raw = raw[:draw(st.integers(0, len(raw)))]
  elif cut == "flip":
    i = draw(st.integers(0, len(raw) - 1))
    raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
  return raw, name


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image_files(), st.sampled_from([1, 3]))
def test_fuzzed_image_files_decode_or_fail_clearly(tmp_path, file, channels):
  raw, name = file
  path = tmp_path / name
  path.write_bytes(raw)
  try:
    image = decode.decode_file(path, 8)
  except ValueError as e:
    assert re.fullmatch(rf"Cannot read image {re.escape(str(path))}: .+\. Replace or "
                        r"remove the file\.", str(e), re.DOTALL), str(e)
    with pytest.raises(ValueError, match=f"^Cannot read image {re.escape(str(path))}: "):
      predict.read_image(str(path), (8, 8, channels))
    event("refused")
    return
  event(f"decoded to {image.shape[-1]} channel(s)")
  assert image.dtype == np.uint8 and image.shape in ((8, 8, 1), (8, 8, 3))
  assert predict.read_image(str(path), (8, 8, channels)).shape == (8, 8, channels)
