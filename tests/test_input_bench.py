"""benchmarks/input_pipeline.py, tiny: the JPEG maker, and a full run whose JSON holds a
positive rate for every configuration.

Nothing here asserts a speed: the figures belong in the printed table. 64 JPEGs of 64x48
(made by a pool of processes), batch 16, image 32, one round of tf.data, vit_jax(0),
tf.data, vit_jax(2): each run a fresh subprocess (5-15 s of imports apiece on 2 cores).
"""
import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "input_pipeline.py"


def _bench_module():
  spec = importlib.util.spec_from_file_location("input_pipeline_bench", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _digests(root: pathlib.Path) -> dict[str, str]:
  return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted((root / "train").rglob("*.jpg"))}


def test_make_images_is_deterministic_and_skips_what_is_there(tmp_path):
  bench = _bench_module()  # Under 32 images it writes them in-process: no fork of pytest.
  first = bench.make_images(tmp_path / "a", 30, 64, 48, 90, seed=1)
  assert not first["skipped"] and first["bytes"] > 0
  digests = _digests(tmp_path / "a")
  assert len(digests) == 30 and "train/class_3/00013.jpg" in digests
  assert len({name.split("/")[1] for name in digests}) == bench.NUM_CLASSES
  assert bench.make_images(tmp_path / "a", 30, 64, 48, 90, seed=1)["skipped"]
  bench.make_images(tmp_path / "b", 30, 64, 48, 90, seed=1)
  assert _digests(tmp_path / "b") == digests
  paths, labels = bench.file_list(tmp_path / "a")
  assert len(paths) == 30 and sorted(set(labels)) == list(range(bench.NUM_CLASSES))


def test_tiny_run_reports_a_positive_rate_for_every_configuration(tmp_path):
  out = tmp_path / "runs.json"
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), f"--root={tmp_path / 'jpegs'}", "--make-images=64",
       "--jpeg-size=64x48", "--batch-size=16", "--image-size=32", "--batches=2",
       "--rounds=1", "--workers=0,2", f"--json={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  runs = record["runs"]
  assert [r.get("error") for r in runs] == [None] * 4, proc.stdout[-3000:]
  assert [(r["pipeline"], r["workers"]) for r in runs] == [
      ("tf", None), ("vit_jax", 0), ("tf", None), ("vit_jax", 2)]
  for run in runs:
    assert run["images_per_sec"] > 0 and run["start_s"] >= 0 and run["num_files"] == 64
  assert all(r["vs_tf"] > 0 for r in runs if r["pipeline"] == "vit_jax")
  assert record["meta"]["images"]["count"] == 64 and record["meta"]["cpu_count"] >= 1
  assert "| tf.data (big_vision) | AUTOTUNE |" in proc.stdout
  assert "| vit_jax | 2 |" in proc.stdout
