"""What a run writes for people: metrics.jsonl, TensorBoard events, the console line, and
the training curves drawn from metrics.jsonl (workdir/pictures/training_curves.png).

Only process 0 writes; the other processes of a multi-host run get no-op writers.
matplotlib and tensorboardX are imported where they are used: bench mode, which runs
the train step without writing anything, does not need them.
"""
from __future__ import annotations

import io
import json
import math
import sys
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np

from vit_jax import errors, paths

DPI = 100
CURVE_PANEL_INCHES = (5.0, 4.0)  # Width, height of one training-curve panel.
_CURVES = (("loss", "loss"), ("top1", "top-1 accuracy"), ("top5", "top-5 accuracy"))
# The same in every panel; "*_raw": the raw weights of a run with EMA (eval/val score the EMA).
_SPLIT_COLORS = {"train": "C0", "eval": "C1", "val": "C2", "eval_raw": "C3", "val_raw": "C4"}


class MetricsWriter:
  """Appends `{"step": S, name: value, ...}` lines to workdir/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      paths.makedirs(workdir)
      self._tb = tensorboard_writer(paths.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    paths.append_text(self.path, json.dumps(row) + "\n")
    for name, value in scalars.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def truncate_after(self, step: int, final_key: str) -> None:
    """Drops rows past `step`, and the one at `step` that holds `final_key` (the final
    evaluation, logged after the last checkpoint): a resumed run rewrites what the crashed
    or finished run logged later."""
    if not self.enabled or not paths.exists(self.path):
      return

    def kept(row: dict) -> bool:
      return row["step"] < step or (row["step"] == step and final_key not in row)

    rows = [line for line in paths.read_text(self.path).splitlines(keepends=True)
            if line.strip() and kept(json.loads(line))]
    paths.write_text_atomic(self.path, "".join(rows))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _ObjectRecordWriter:
  """tensorboardX's record writer for a logdir on an object store (gs://, s3://, ...): the
  events file in memory, uploaded whole (one object upload) at each flush.

  Replaces tensorboardX's own gs:// writer, which uploads again from __del__ after close
  (retrying for minutes once the store is gone) and knows no other scheme. The file grows
  with the run's scalars (about 100 bytes each), so each upload stays small.
  """

  def __init__(self, path: str):
    self.path = path
    self._events = io.BytesIO()
    self._uploaded = 0
    self._lock = threading.Lock()  # tensorboardX also flushes from a thread of its own.

  def write(self, data: bytes) -> None:
    with self._lock:
      self._events.write(data)

  def flush(self) -> None:
    with self._lock:
      if self._events.tell() != self._uploaded:
        paths.write_bytes_atomic(self.path, self._events.getvalue())
        self._uploaded = self._events.tell()

  def close(self) -> None:
    self.flush()  # Uploads nothing when nothing was written since the last flush.


class _ObjectWriterFactory:

  def open(self, path: str) -> _ObjectRecordWriter:
    return _ObjectRecordWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # Object stores have no folders to make.


def tensorboard_writer(logdir: str):
  """A tensorboardX SummaryWriter into `logdir`, local or on an object store."""
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top
  if paths.is_remote(logdir):
    record_writer.register_writer_factory(logdir.partition(":")[0], _ObjectWriterFactory())
  return SummaryWriter(logdir)


def read_metrics(workdir: str) -> list[dict]:
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def _jsonable(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them readable.
  return value


class Progress:
  """One console line per log step: step, loss, images/s and ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start = total_steps, start_step
    self.t0 = time.time()
    self.enabled = jax.process_index() == 0

  def update(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    width = 24
    filled = int(width * step / max(self.total, 1))
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total}"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("eval/top1", "top1 {:.4f}"),
                     ("train/images_per_sec", "{:.1f} img/s")):
      if key in scalars:
        parts.append(fmt.format(scalars[key]))
    parts.append(f"ETA {_duration(eta)}")
    print("  ".join(parts), file=sys.stdout, flush=True)


def print_summary(lines: dict[str, object]) -> None:
  """The end-of-run block: one "key: value" line each (process 0)."""
  if jax.process_index() != 0:
    return
  print("=" * 60)
  for key, value in lines.items():
    print(f"{key:>24}: {value}")
  print("=" * 60, flush=True)


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- Pictures ---------------------------------------------------------------------------


def pictures_dir(workdir: str) -> str:
  """Where a run's pictures go."""
  return paths.join(workdir, "pictures")


def save_png(fig, path: str) -> str:
  """Writes a matplotlib Figure as a PNG atomically: a reader sees the old file or the new
  one, never half."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  FigureCanvasAgg(fig)  # Renders with Agg whatever backend the process has chosen.
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=DPI)
  paths.write_bytes_atomic(path, png.getvalue())
  return path


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  """Steps and values of `key`, skipping rows without it and non-finite values."""
  points = [(row["step"], float(row[key])) for row in rows if key in row]
  points = [(step, value) for step, value in points if math.isfinite(value)]
  return [s for s, _ in points], [v for _, v in points]


def plot_training_curves(workdir: str) -> str:
  """Loss, top-1 and top-5 against steps for train, eval and val, one panel each.

  Draws what workdir/metrics.jsonl holds (training logs no train accuracy, so top-1/5
  show eval and val) into workdir/pictures/training_curves.png.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  rows = read_metrics(workdir)
  if not rows:
    raise errors.NoRunError(f"No metrics in {workdir}/metrics.jsonl yet: train first.")
  width, height = CURVE_PANEL_INCHES
  fig = Figure(figsize=(width * len(_CURVES), height), layout="constrained")
  for ax, (metric, label) in zip(fig.subplots(1, len(_CURVES)), _CURVES):
    for split, color in _SPLIT_COLORS.items():
      steps, values = _series(rows, f"{split}/{metric}")
      if steps:
        # Evaluations are sparse: markers show where they were taken (and a lone point).
        marker = None if split == "train" and len(steps) > 1 else "o"
        ax.plot(steps, values, label=split, color=color, marker=marker, markersize=3)
    ax.set(title=f"{label} over steps", xlabel="step", ylabel=label)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
  fig.suptitle(f"training curves: {paths.basename(workdir)}")
  return save_png(fig, paths.join(pictures_dir(workdir), "training_curves.png"))


# The confusion matrix: counts written in the cells up to this many classes, class names
# on the axes up to MAX_LABELLED_CLASSES; above, the matrix alone (e.g. ImageNet's 1000).
MAX_ANNOTATED_CLASSES = 20
MAX_LABELLED_CLASSES = 40


def plot_confusion_matrix(confusion_KxK, class_names: Sequence[str], title: str,
                          path: str) -> str:
  """The confusion matrix (rows: true class, columns: top-1 prediction) as a picture.

  Each row is coloured by its share of the true class's examples, so that classes of
  different sizes compare; the counts are written in the cells of small matrices.

  Args:
    confusion_KxK: counts, e.g. `eval_sums(...)["confusion"]` added over a split.
    class_names: the K class names, in label order.
    title: the figure's title.
    path: the .png file to write.

  Returns:
    `path`.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  counts_KxK = np.asarray(confusion_KxK, np.int64)
  num_classes = len(class_names)
  rows_K1 = counts_KxK.sum(axis=1, keepdims=True)
  share_KxK = counts_KxK / np.maximum(rows_K1, 1)
  side = min(3.0 + 0.45 * num_classes, 16.0)
  fig = Figure(figsize=(side + 1.5, side), layout="constrained")
  ax = fig.subplots()
  image = ax.imshow(share_KxK, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, label="share of the true class's examples")
  if num_classes <= MAX_LABELLED_CLASSES:
    ax.set_xticks(range(num_classes), class_names, rotation=90)
    ax.set_yticks(range(num_classes), class_names)
  if num_classes <= MAX_ANNOTATED_CLASSES:
    for (true, predicted), count in np.ndenumerate(counts_KxK):
      ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
              color="white" if share_KxK[true, predicted] > 0.5 else "black")
  ax.set(xlabel="predicted class (top-1)", ylabel="true class", title=title)
  return save_png(fig, path)
