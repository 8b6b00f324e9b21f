r"""The training input pipeline's images/s against big_vision's tf.data pipeline, on the same JPEGs.

  python benchmarks/input_pipeline.py --root=/tmp/vit_jax_jpegs --make-images=2000 \
      --json=/tmp/vit_jax_input.json

--make-images=N first writes N photo-like JPEGs (500x375, quality 90, smooth random colour
fields plus grain: 30-60 kB each) to ROOT/train/class_K/NNNNN.jpg over 10 classes,
deterministically from --seed; a ROOT that already holds that set is left as it is. Without
it, ROOT must already hold ROOT/train/CLASS/*.jpg (JPEG only: tf.data decodes with
decode_and_crop_jpeg).

Two pipelines read those files on the same cores, interleaved: for each worker count W of
--workers, one round runs tf.data then vit_jax(W), each in a fresh subprocess (one's
threads and processes cannot slow the next). Both end where a training step starts: each
batch a global jax.Array over parallel.make_mesh()'s devices, put there by a thread.
  tf.data   big_vision's training input: file list -> shuffle -> map(read_file,
            sample_distorted_bounding_box(area 0.08-1, aspect 3/4-4/3, 10 attempts),
            decode_and_crop_jpeg, resize to --image-size (bilinear), random flip, uint8;
            AUTOTUNE) -> repeat -> batch(drop_remainder) -> prefetch(AUTOTUNE) ->
            as_numpy_iterator() -> big_vision's start_global (a thread puts 2 batches
            ahead on the devices); GPUs hidden from TF; TF's default thread pools (all
            cores). Not copied from big_vision: its host options
            (private_threadpool_size=48, max_intra_op_parallelism=1) and its TFDS record
            files.
  vit_jax   data.load_source(config, "train") of the folder (config.dataset="folder",
            aug.crop="inception", aug.flip=True, config.input.worker_count=W), then
            data.measure_input_throughput: images/s of the training iterator alone (grain:
            decode + inception crop at full resolution + flip in W worker processes, 0 =
            in-process threads).
            The load_source time is reported apart from that rate ("start s").
Each run times --batches batches after a warm-up (--warmup batches for tf.data; one inside
measure_input_throughput). The table gives per configuration the median images/s over
rounds, the range, the median ratio of each vit_jax run to the tf.data run just before it,
the start-up time (tf.data: building the pipeline and its warm-up batches; vit_jax:
load_source) and the peak RSS of the measuring process (not of any worker processes).
With --json, every run's record is written there as well.

Time on the idle 2-core build machine, --rounds=2 (12 runs): about 3 minutes (measured),
making 2,000 JPEGs first 21 s more. Each run pays about 3 s (vit_jax) or 8 s (tf.data) of
imports, then a few seconds of decoding. Runs of a few batches are noisy (the same tf.data
run gives 920-1,320 img/s): keep the default --batches and at least 2 rounds for figures.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
_MARKER = "bench_images.json"  # Written beside train/ by --make-images: what ROOT holds.
_JPEG_SUFFIXES = (".jpg", ".jpeg")


# --- Photo-like JPEGs --------------------------------------------------------------------

_GRAIN: dict[tuple[int, int, int], object] = {}


def _grain(seed: int, width: int, height: int):
  """Gaussian grain (sigma 8, int16) twice the image size; each image takes a window."""
  import numpy as np
  key = (seed, width, height)
  if key not in _GRAIN:
    rng = np.random.default_rng([seed, 2**31])
    _GRAIN[key] = rng.normal(0, 8, (2 * height, 2 * width, 3)).round().astype(np.int16)
  return _GRAIN[key]


def photo_like(index: int, seed: int, width: int, height: int):
  """A PIL image: three smooth random colour fields of falling scale (bicubic upsampling
  of coarse random grids, summed on the finest grid and upsampled once), a colour cast
  and film grain of random strength."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng([seed, index])
  fine = (48, max(2, 48 * height // width + 1))  # The finest grid, (width, height).
  small = rng.integers(-60, 60, 3).astype(np.int16)
  for cells, shift in ((3, 0), (12, 1), (48, 3)):
    grid = rng.integers(0, 256, (max(2, cells * height // width + 1), cells + 1, 3),
                        dtype=np.uint8)
    field = Image.fromarray(grid).resize(fine, Image.Resampling.BICUBIC)
    small = small + (np.asarray(field, np.int16) >> shift)
  smooth = Image.fromarray(np.clip(small >> 1, 0, 255).astype(np.uint8)).resize(
      (width, height), Image.Resampling.BICUBIC)
  y, x = rng.integers(0, height), rng.integers(0, width)
  grain = _grain(seed, width, height)[y:y + height, x:x + width]
  image = np.asarray(smooth, np.int16) + ((grain * rng.integers(4, 9)) >> 3)  # Sigma 4-8.
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _image_path(root: pathlib.Path, index: int) -> pathlib.Path:
  return root / "train" / f"class_{index % NUM_CLASSES}" / f"{index:05d}.jpg"


def _write_images(root: str, indices: range, seed: int, width: int, height: int,
                  quality: int) -> int:
  """Writes the images `indices`; returns their bytes (runs in a pool process)."""
  total = 0
  for index in indices:
    path = _image_path(pathlib.Path(root), index)
    photo_like(index, seed, width, height).save(path, "JPEG", quality=quality)
    total += path.stat().st_size
  return total


def make_images(root: pathlib.Path, count: int, width: int, height: int, quality: int,
                seed: int) -> dict:
  """ROOT/train/class_K/NNNNN.jpg, image i in class i % 10; skipped if ROOT holds them."""
  wanted = {"count": count, "width": width, "height": height, "quality": quality,
            "seed": seed, "complete": True}
  marker = root / _MARKER
  if marker.exists():
    held = json.loads(marker.read_text())
    if held == wanted and all(_image_path(root, i).exists() for i in range(count)):
      return {**held, "seconds": 0.0, "skipped": True,
              "bytes": sum(_image_path(root, i).stat().st_size for i in range(count))}
    shutil.rmtree(root / "train", ignore_errors=True)  # Ours (the marker says so): redo.
  elif root.exists() and any(root.iterdir()):
    raise SystemExit(f"{root} is not empty and was not written by --make-images: choose "
                     "another --root, or leave out --make-images to read its images.")
  start = time.perf_counter()
  for k in range(NUM_CLASSES):
    (root / "train" / f"class_{k}").mkdir(parents=True, exist_ok=True)
  marker.write_text(json.dumps({**wanted, "complete": False}))
  processes = min(4, os.cpu_count() or 1, count // 32)
  chunk = 16
  if processes <= 1:
    total = _write_images(str(root), range(count), seed, width, height, quality)
  else:
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
      total = sum(f.result() for f in [
          pool.submit(_write_images, str(root), range(i, min(i + chunk, count)), seed,
                      width, height, quality) for i in range(0, count, chunk)])
  marker.write_text(json.dumps(wanted))
  return {**wanted, "seconds": round(time.perf_counter() - start, 1), "skipped": False,
          "bytes": total}


def file_list(root: pathlib.Path) -> tuple[list[str], list[int]]:
  """(paths, labels) of ROOT/train/CLASS/*.jpg, classes in sorted order (as folders.py)."""
  class_dirs = sorted(p for p in (root / "train").iterdir()
                      if p.is_dir() and not p.name.startswith("."))
  paths, labels = [], []
  for label, folder in enumerate(class_dirs):
    for path in sorted(folder.iterdir()):
      if path.suffix.lower() in _JPEG_SUFFIXES and not path.name.startswith("."):
        paths.append(str(path))
        labels.append(label)
  if not paths:
    raise SystemExit(f"No JPEGs in {root}/train/CLASS/: make some with --make-images=N.")
  return paths, labels


# --- The two pipelines (each run in its own subprocess) ------------------------------------


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB.


def _on_devices(batches, prefetch: int = 2):
  """big_vision's start_global: a thread makes each numpy batch a global jax.Array split
  over the devices (the same layout as vit_jax's batches), `prefetch` batches ahead."""
  import jax
  from vit_jax import parallel
  sharding = parallel.batch_sharding(parallel.make_mesh())
  ready = queue.Queue(prefetch)

  def put():
    for batch in batches:
      ready.put({k: jax.make_array_from_process_local_data(sharding, v)
                 for k, v in batch.items()})
  threading.Thread(target=put, daemon=True).start()
  while True:
    yield ready.get()


def run_tf_data(args: argparse.Namespace) -> dict:
  """big_vision's training input pipeline over the files; images/s of as_numpy_iterator."""
  import jax
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  tf.random.set_seed(args.seed)
  paths, labels = file_list(pathlib.Path(args.root))
  size = args.image_size

  def decode_crop_flip(path, label):
    data = tf.io.read_file(path)
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(data), bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        min_object_covered=0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop)
    image = tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, (size, size))
    image = tf.image.random_flip_left_right(image)
    return {"image": tf.cast(image, tf.uint8), "label": label}

  start = time.perf_counter()
  dataset = (tf.data.Dataset.from_tensor_slices((paths, labels))
             .shuffle(len(paths), seed=args.seed, reshuffle_each_iteration=True)
             .map(decode_crop_flip, num_parallel_calls=tf.data.AUTOTUNE)
             .repeat()
             .batch(args.batch_size, drop_remainder=True)
             .prefetch(tf.data.AUTOTUNE))
  batches = _on_devices(dataset.as_numpy_iterator())
  for _ in range(args.warmup):
    batch = jax.block_until_ready(next(batches))
  start_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = jax.block_until_ready(next(batches))
  elapsed = time.perf_counter() - start
  assert batch["image"].shape == (args.batch_size, size, size, 3), batch["image"].shape
  return {"images_per_sec": args.batches * args.batch_size / elapsed,
          "start_s": start_s, "num_files": len(paths), "tf_version": tf.__version__}


def run_vit_jax(args: argparse.Namespace) -> dict:
  """vit_jax's folder source and training iterator; measure_input_throughput's images/s."""
  from vit_jax import config as config_lib, data, parallel
  config = config_lib.get_base_config()
  config.dataset = "folder"
  config.data_dir = args.root
  config.train_split = "train"
  config.image_size = args.image_size
  config.aug.crop = "inception"
  config.aug.flip = True
  config.batch_size = args.batch_size
  config.seed = args.seed
  config.input.worker_count = args.worker_count
  mesh = parallel.make_mesh()
  start = time.perf_counter()
  source = data.load_source(config, "train")
  start_s = time.perf_counter() - start
  rate = data.measure_input_throughput(source, config, mesh, num_batches=args.batches)
  return {"images_per_sec": rate, "start_s": start_s, "num_files": len(source),
          "devices": mesh.size,
          "tensorflow_imported": "tensorflow" in sys.modules}


def child_main(args: argparse.Namespace) -> None:
  record = run_tf_data(args) if args.child == "tf" else run_vit_jax(args)
  record["peak_rss_mb"] = _peak_rss_mb()
  print(json.dumps(record), flush=True)


# --- Rounds, table ----------------------------------------------------------------------


def run_once(args: argparse.Namespace, pipeline: str, workers: int | None,
             round_index: int) -> dict:
  """One measurement in a fresh subprocess; its last JSON line, or the error."""
  argv = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--child={pipeline}",
          f"--root={args.root}", f"--batch-size={args.batch_size}",
          f"--image-size={args.image_size}", f"--batches={args.batches}",
          f"--warmup={args.warmup}", f"--seed={args.seed}",
          f"--worker-count={workers or 0}"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
             PYTHONUNBUFFERED="1")
  started = time.time()
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=args.timeout)
    record = next((json.loads(line) for line in reversed(proc.stdout.splitlines())
                   if line.startswith("{")), None)
    if record is None:
      record = {"error": (proc.stderr or proc.stdout)[-2000:] or f"exit {proc.returncode}"}
  except subprocess.TimeoutExpired:
    record = {"error": f"timed out after {args.timeout} s"}
  record.update(pipeline=pipeline, workers=workers, round=round_index,
                wall_s=round(time.time() - started, 1),
                started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)))
  return record


def _label(record: dict) -> tuple[str, str]:
  if record["pipeline"] == "tf":
    return "tf.data (big_vision)", "AUTOTUNE"
  return "vit_jax", str(record["workers"])


def summarize(records: list[dict], meta: dict) -> str:
  ok = [r for r in records if "error" not in r]
  images = meta["images"]
  lines = [
      f"Input pipelines on {images['count']} JPEGs in {meta['root']} "
      f"(mean {images['mean_kb']:.0f} kB), batch {meta['batch_size']}, image "
      f"{meta['image_size']}, {meta['batches']} timed batches per run, {meta['rounds']} "
      "round(s)",
      f"cores: os.cpu_count()={meta['cpu_count']}, usable {meta['usable_cores']}; load "
      f"average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in meta['load_start'])}, "
      f"at end {'/'.join(f'{x:.2f}' for x in meta['load_end'])}",
      "",
      "| pipeline | workers | img/s median | range | runs | vs tf.data | start s | RSS MB |",
      "|---|---|---|---|---|---|---|---|"]
  configs: dict[tuple[str, str], list[dict]] = {}
  for record in ok:
    configs.setdefault(_label(record), []).append(record)
  for (name, workers), runs in configs.items():
    rates = [r["images_per_sec"] for r in runs]
    ratios = [r["vs_tf"] for r in runs if r.get("vs_tf")]
    ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
    lines.append(
        f"| {name} | {workers} | {statistics.median(rates):.1f} | {min(rates):.1f}-"
        f"{max(rates):.1f} | {len(runs)} | {ratio} | "
        f"{statistics.median(r['start_s'] for r in runs):.1f} | "
        f"{max(r['peak_rss_mb'] for r in runs):.0f} |")
  lines.append("")
  lines.append("start s: tf.data = building the pipeline and its warm-up batches; vit_jax = "
               "load_source. RSS: the measuring process only. vs tf.data: median of each "
               "run's rate over the tf.data run just before it.")
  for record in records:
    if "error" in record:
      lines.append(f"ERROR {'/'.join(_label(record))} round {record['round']}: "
                   f"{record['error'][-300:]}")
  return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="ROOT/train/CLASS/*.jpg")
  parser.add_argument("--make-images", "--make_images", type=int, default=0,
                      help="First write this many JPEGs to ROOT (0 = use what is there).")
  parser.add_argument("--jpeg-size", "--jpeg_size", default="500x375",
                      help="WIDTHxHEIGHT of the made JPEGs.")
  parser.add_argument("--quality", type=int, default=90, help="JPEG quality of made images.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", default="0,1,2",
                      help="Comma-separated config.input.worker_count values of vit_jax.")
  parser.add_argument("--rounds", type=int, default=3, help="0 = only make the images.")
  parser.add_argument("--batches", type=int, default=10, help="Timed batches per run.")
  parser.add_argument("--warmup", type=int, default=1,
                      help="tf.data's untimed batches (measure_input_throughput takes 1).")
  parser.add_argument("--batch-size", "--batch_size", type=int, default=256)
  parser.add_argument("--image-size", "--image_size", type=int, default=224)
  parser.add_argument("--timeout", type=int, default=1800, help="Seconds per run.")
  parser.add_argument("--json", default="", help="Also write every run's record here.")
  parser.add_argument("--child", choices=("tf", "vit_jax"), help=argparse.SUPPRESS)
  parser.add_argument("--worker-count", type=int, default=0, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.child:
    child_main(args)
    return
  root = pathlib.Path(args.root).resolve()
  args.root = str(root)
  load_start = os.getloadavg()
  if args.make_images:
    width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
    made = make_images(root, args.make_images, width, height, args.quality, args.seed)
    print(f"{'Found' if made['skipped'] else 'Made'} {made['count']} JPEGs of "
          f"{width}x{height} in {root} ({made['bytes'] / made['count'] / 1e3:.1f} kB mean"
          f"{'' if made['skipped'] else ', ' + str(made['seconds']) + ' s'}).", flush=True)
  if args.rounds <= 0:
    return
  paths, _ = file_list(root)
  workers = [int(w) for w in args.workers.split(",") if w.strip()]
  records: list[dict] = []
  for round_index in range(args.rounds):
    for w in workers:  # tf.data, vit_jax(w), tf.data, vit_jax(w'), ...
      for pipeline, count in (("tf", None), ("vit_jax", w)):
        record = run_once(args, pipeline, count, round_index)
        if pipeline == "vit_jax" and "error" not in record and "error" not in records[-1]:
          record["vs_tf"] = record["images_per_sec"] / records[-1]["images_per_sec"]
        records.append(record)
        value = (f"{record['images_per_sec']:.1f} img/s" if "error" not in record
                 else "ERROR")
        print(f"[round {round_index}] {'/'.join(_label(record))}: {value} "
              f"({record['wall_s']} s)", flush=True)
  meta = {"root": args.root, "batch_size": args.batch_size, "image_size": args.image_size,
          "batches": args.batches, "warmup": args.warmup, "rounds": args.rounds,
          "workers": workers, "cpu_count": os.cpu_count(),
          "usable_cores": len(os.sched_getaffinity(0)), "load_start": load_start,
          "load_end": os.getloadavg(),
          "images": {"count": len(paths),
                     "mean_kb": sum(os.path.getsize(p) for p in paths) / len(paths) / 1e3}}
  table = summarize(records, meta)
  print(table)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "runs": records}, indent=1))


if __name__ == "__main__":
  main()
