r"""vit_jax's train step against the peers of ../shared/peers, interleaved on one machine.

  python benchmarks/compare_peers.py --peers=../shared/peers --rounds=3 \
      --out=/tmp/vit_jax_peers.jsonl

Every system runs as its own fresh subprocess (it compiles and warms up alone), once per
round, and the order rotates between rounds, so slow phases of a noisy machine hit every
system alike. Each run reports images/s = batch / median step time; the table gives the
median over rounds and the range. float32, batch 256, synthetic CIFAR-shaped uint8 data.
The peers need their own virtual environments (see the peers' README); their
interpreters come from --jax_python and --torch_python.

`vit_jax` rows are `main.py --mode=bench`: the real train step of the config, with its
on-device augmentation ("full aug") or with the augmentation switched off ("model only",
what the PyTorch and plain-Flax peers time: they only normalise and resize in the step).
--alt_python adds the same rows under a second interpreter with vit_jax installed
(Python 3.12 gets jax 0.12, 3.11 stops at jax 0.10.2), interleaved with the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Augmentation off and regularisers that cost time off: the model alone.
_TI_MODEL_ONLY = ("--config.aug.crop=none", "--config.aug.flip=False",
                  "--config.aug.randaugment_layers=0", "--config.aug.mixup_alpha=0",
                  "--config.aug.cutmix_alpha=0", "--config.aug.random_erasing=0",
                  "--config.model.overrides.stochastic_depth_rate=0")
_KERAS_MODEL_ONLY = ("--config.aug.flip=False", "--config.aug.rotate=0", "--config.aug.zoom=0")


def systems(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
  """(key, label, argv) of every measured system."""
  peers, jax_py, torch_py = args.peers, args.jax_python, args.torch_python
  steps, warm = str(args.steps), "1"

  def ours(config: str, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), "--mode=bench", f"--config={config}",
            f"--config.bench.steps={args.steps}", "--config.bench.warmup_steps=1",
            "--config.bench.eval_steps=1", "--config.bench.input_batches=0", *overrides]

  rows = [
      ("matmul", "XLA f32 matmul 2048^3 (GFLOP/s)", [jax_py, f"{peers}/matmul_bench.py"]),
      ("A_keras", "Keras example, model.fit, full aug (A)",
       [jax_py, f"{peers}/keras_seed.py", "--bench-steps", str(args.keras_steps),
        "--bench-warmup", warm]),
      ("ours_keras", "vit_jax keras-example, full aug", ours("configs/cifar100.py:keras")),
      ("B1k_torch", "PyTorch eager keras encoder 4x64 (B1k)",
       [torch_py, f"{peers}/torch_vit.py", "--model", "keras_encoder", "--keras-attention",
        "--steps", steps, "--warmup", warm]),
      ("ours_keras_model", "vit_jax keras-example, model only",
       ours("configs/cifar100.py:keras", *_KERAS_MODEL_ONLY)),
      ("C1k_flax", "plain Flax keras encoder 4x64 (C1k)",
       [jax_py, f"{peers}/flax_ref.py", "--model", "keras_encoder", "--keras-attention",
        "--steps", steps, "--warmup", warm]),
      ("B2_torch", "PyTorch eager timm ViT-Ti/4 (B2)",
       [torch_py, f"{peers}/torch_vit.py", "--model", "vit_ti4", "--steps", steps,
        "--warmup", warm]),
      ("ours_ti_model", "vit_jax ViT-Ti/4, model only",
       ours("configs/cifar100.py", *_TI_MODEL_ONLY)),
      ("C2_flax", "plain Flax ViT-Ti/4 (C2)",
       [jax_py, f"{peers}/flax_ref.py", "--model", "vit_ti4", "--steps", steps,
        "--warmup", warm]),
      ("ours_ti", "vit_jax ViT-Ti/4, full CIFAR-100 recipe", ours("configs/cifar100.py")),
  ]
  if args.alt_python:  # The same vit_jax rows under another interpreter (e.g. jax 0.12).
    rows += [(f"{key}_alt", f"{label} [{args.alt_python}]", [args.alt_python, *argv[1:]])
             for key, label, argv in rows if key.startswith("ours_")]
  return rows


def _images_per_sec(record: dict) -> float | None:
  return record.get("train/images_per_sec", record.get("images_per_sec"))


def run_once(key: str, argv: list[str], round_index: int) -> dict:
  t0 = time.time()
  env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1")
  proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
  record = next((json.loads(line) for line in reversed(proc.stdout.splitlines())
                 if line.startswith("{")), None)
  if record is None:
    record = {"error": (proc.stderr or proc.stdout)[-2000:]}
  record.update(key=key, round=round_index, wall_s=round(time.time() - t0, 1),
                started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)))
  return record


def summarize(records: list[dict], labels: dict[str, str]) -> str:
  by_key: dict[str, list[dict]] = {}
  for record in records:
    if "error" not in record:
      by_key.setdefault(record["key"], []).append(record)
  lines = ["| system | img/s median | range | runs |", "|---|---|---|---|"]
  medians = {}
  for key, label in labels.items():
    runs = by_key.get(key, [])
    values = [r["gflops"] if key == "matmul" else _images_per_sec(r) for r in runs]
    if not values:
      continue
    medians[key] = statistics.median(values)
    lines.append(f"| {label} | {medians[key]:.1f} | {min(values):.1f}-{max(values):.1f} "
                 f"| {len(values)} |")
  ratios = (("ours_keras", "A_keras"), ("ours_keras_model", "B1k_torch"),
            ("ours_keras_model", "C1k_flax"), ("ours_ti_model", "B2_torch"),
            ("ours_ti_model", "C2_flax"), ("ours_ti", "B2_torch"))
  ratios += tuple((f"{ours}_alt", peer) for ours, peer in ratios)
  lines.append("")
  for ours, peer in ratios:
    if ours in medians and peer in medians:
      lines.append(f"{labels[ours]} / {labels[peer]}: {medians[ours] / medians[peer]:.2f}x")
  for record in records:
    if "error" in record:
      lines.append(f"ERROR {record['key']} round {record['round']}: {record['error'][-300:]}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--peers", default=str(REPO.parent / "shared" / "peers"))
  parser.add_argument("--jax_python", default="/tmp/peers-venv/bin/python")
  parser.add_argument("--torch_python", default="/tmp/peers-torch-venv/bin/python")
  parser.add_argument("--alt_python", default="",
                      help="Also time the vit_jax rows under this interpreter, whose "
                           "environment has vit_jax installed (e.g. Python 3.12, jax 0.12).")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=4, help="Timed steps per run.")
  parser.add_argument("--keras_steps", type=int, default=3, help="Timed steps, Keras.")
  parser.add_argument("--only", default="", help="Comma-separated keys to run.")
  parser.add_argument("--out", default="/tmp/vit_jax_peers.jsonl")
  parser.add_argument("--summarize_only", action="store_true")
  args = parser.parse_args()
  todo = [s for s in systems(args) if not args.only or s[0] in args.only.split(",")]
  labels = {key: label for key, label, _ in systems(args)}
  if not args.summarize_only:
    for round_index in range(args.rounds):
      start = round_index * 3 % len(todo)
      for key, _, argv in todo[start:] + todo[:start]:
        record = run_once(key, argv, round_index)
        with open(args.out, "a") as f:
          f.write(json.dumps(record) + "\n")
        value = record.get("gflops") or _images_per_sec(record) or "ERROR"
        print(f"[round {round_index}] {key}: {value} ({record['wall_s']} s)", flush=True)
  with open(args.out) as f:
    records = [json.loads(line) for line in f if line.startswith("{")]
  print(summarize(records, labels))


if __name__ == "__main__":
  main()
