"""What a run writes for people: metrics.jsonl, TensorBoard events, the console line.

Only process 0 writes; the other processes of a multi-host run get no-op writers.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax


class MetricsWriter:
  """Appends `{"step": S, name: value, ...}` lines to workdir/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # Imported here: only the writer needs it.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in scalars.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step`: a resumed run rewrites what the crashed run logged later."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(rows)
    os.replace(tmp, self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _jsonable(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them readable.
  return value


class Progress:
  """One console line per log step: step, loss, images/s and ETA; a summary at the end."""

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

  def summary(self, lines: dict[str, object]) -> None:
    if not self.enabled:
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
