r"""Top-5 predictions for image files, from nothing but a training workdir.

  python main.py --mode=predict --workdir=DIR --images=shoe.jpg,more_images/ [--format=json]

Each file goes through the evaluation pipeline: decoded with PIL as image folders are
(`vit_jax.data.decode`), converted to the channels the model was trained on (run.json
`image_shape`: L for 1, RGB for 3), resized on the host to the stored size, then
`augment.eval_preprocess` and the model (its logits averaged with the mirror image's when
the run set config.aug.eval_flip), in batches under one jitted program. Files that cannot
be read are reported by name and skipped; the command fails only when none could be read.

Public API:
  predict_files(workdir, images, which="best", fmt="table") -> list of result dicts
      {"image": PATH, "top5": [{"label": NAME, "prob": P}, ...]} or {"image": PATH,
      "error": MESSAGE}; prints them as a table or as JSON lines.
  expand_paths(images) -> files: folders replaced by their jpg/jpeg/png files, sorted.
  read_image(path, image_shape) -> uint8 [H, W, C] as the model's input pipeline stores it.
  read_images(paths, image_shape) -> (readable paths, uint8 [N, H, W, C], {path: error}).
  make_forward(trained, attention=False) -> jitted (params, uint8 images) -> probabilities
      [, attention weights]; run_batched(forward, params, images, batch_size) runs it.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import data, errors, paths
from vit_jax.data import augment, decode, preprocess
from vit_jax.train import steps, workdir as workdir_lib

TOP_K = 5


def expand_paths(images: Sequence[str]) -> list[str]:
  """Files as given, folders replaced by their image files (sorted by name).

  Paths that do not exist are kept, so that they are reported as missing.
  """
  files = []
  for path in images:
    if paths.isdir(path):
      files.extend(paths.join(path, name) for name in paths.listdir(path)
                   if name.lower().endswith(decode.IMAGE_EXTENSIONS) and not name.startswith("."))
    else:
      files.append(path)
  return files


def read_image(path: str, image_shape: Sequence[int],
               crop_fraction: float | None = None) -> np.ndarray:
  """uint8 [H, W, C] of the stored `image_shape`: with `crop_fraction`, the central crop
  that the evaluation of a run on photos took (`host_crop_fraction`), else the whole
  image resized (the device then crops it as the run's evaluation did).

  Raises ValueError (naming the file) when it is missing or not a readable image.
  """
  height, width, channels = image_shape
  if height != width:
    raise ValueError(f"Stored image shape {list(image_shape)} is not square: vit_jax only "
                     "stores square images, so this workdir was not made by it.")
  if crop_fraction is not None:  # As a photo source's `get`, so exactly as evaluated.
    encoded = decode.read_image_bytes(path)
    return preprocess.eval_crop(encoded, size=height, crop_fraction=crop_fraction,
                                channels=channels, name=path)
  image = decode.decode_file(path, height)
  return decode.to_channels(image, channels)


def host_crop_fraction(run: dict, config) -> float | None:
  """The evaluation crop to take on the host for a run on photos (run.json's host_crops),
  else None."""
  return config.aug.eval_crop_fraction if run.get("host_crops") else None


def read_images(paths: Sequence[str], image_shape: Sequence[int],
                crop_fraction: float | None = None
                ) -> tuple[list[str], np.ndarray, dict[str, str]]:
  """The readable paths, their images stacked (uint8 [N, H, W, C]), and {path: error}."""
  readable, decoded, failures = [], [], {}
  for path in paths:
    try:
      decoded.append(read_image(path, image_shape, crop_fraction))
      readable.append(path)
    except ValueError as e:
      failures[path] = str(e)
  stacked = np.stack(decoded) if decoded else np.zeros((0, *image_shape), np.uint8)
  return readable, stacked, failures


def make_forward(trained: workdir_lib.Trained, attention: bool = False) -> Callable:
  """Jitted (params, uint8 B x H x W x C) -> softmax B x K [, attention weights per layer]."""
  config, model = data.for_device(trained.config, trained.host_crops), trained.model
  mean_C = jnp.asarray(trained.mean_C, jnp.float32)
  std_C = jnp.asarray(trained.std_C, jnp.float32)

  def forward(params, images_BxHxWxC: jax.Array):
    x_BxSxSxC = augment.eval_preprocess(images_BxHxWxC, config.aug,
                                        image_size=config.image_size, mean_C=mean_C,
                                        std_C=std_C)
    if not attention:
      return jax.nn.softmax(steps.eval_logits(model, params, x_BxSxSxC, config.aug.eval_flip))
    logits_BxK, extra = steps.eval_logits(model, params, x_BxSxSxC, config.aug.eval_flip,
                                          return_intermediates=True)
    return jax.nn.softmax(logits_BxK), extra["attention_weights"]

  return jax.jit(forward)


def run_batched(forward: Callable, params, images_NxHxWxC: np.ndarray, batch_size: int):
  """`forward` over batches of min(N, batch_size), the last padded: one compilation."""
  n = len(images_NxHxWxC)
  batch = max(1, min(n, batch_size))
  outputs = []
  for start in range(0, n, batch):
    chunk = images_NxHxWxC[start:start + batch]
    padded = np.zeros((batch, *chunk.shape[1:]), chunk.dtype)
    padded[:len(chunk)] = chunk
    out = jax.device_get(forward(params, padded))
    outputs.append(jax.tree_util.tree_map(lambda x, k=len(chunk): x[:k], out))
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outputs)


def top_k(probs_K: np.ndarray, class_names: Sequence[str], k: int = TOP_K) -> list[dict]:
  """The k (at most K) likeliest classes, likeliest first."""
  order = np.argsort(-probs_K, kind="stable")[:k]
  return [{"label": class_names[i], "prob": round(float(probs_K[i]), 6)} for i in order]


def format_table(results: Sequence[dict]) -> str:
  """One block per predicted image: its path, then rank, probability and label per line.

  Errors are left out: they have gone to stderr already.
  """
  blocks = []
  for result in results:
    if "top5" in result:
      lines = [f"  {rank}. {entry['prob']:8.2%}  {entry['label']}"
               for rank, entry in enumerate(result["top5"], 1)]
      blocks.append("\n".join([result["image"], *lines]))
  return "\n\n".join(blocks)


def _probabilities(workdir: str, which: str, images_NxHxWxC: np.ndarray) -> np.ndarray:
  trained = workdir_lib.load_trained(workdir, which)
  return run_batched(make_forward(trained), trained.params, images_NxHxWxC,
                     trained.config.eval_batch_size)


def predict_files(workdir: str, images: Sequence[str], which: str = "best",
                  fmt: str = "table") -> list[dict]:
  """Top-5 classes of each image file, printed as a table or JSON lines.

  Args:
    workdir: a training workdir (its run.json and a checkpoint are all that is read).
    images: image files, or folders of .jpg/.jpeg/.png files.
    which: "best" (else the latest) or "latest" checkpoint.
    fmt: "table" or "json" (one line per image).

  Returns:
    Per file, {"image": PATH, "top5": [{"label", "prob"}, ...]}, or {"image": PATH,
    "error": MESSAGE} for a file that cannot be read (also printed to stderr); the other
    files still get predictions.

  Raises:
    errors.NoReadableImageError when no image at all could be read.
  """
  if fmt not in ("table", "json"):
    raise ValueError(f"fmt={fmt!r}: use 'table' or 'json'.")
  paths = expand_paths(images)
  if not paths:
    raise errors.NoReadableImageError(
        f"No image files in {list(images)}: pass files, or folders of "
        f"{'/'.join(decode.IMAGE_EXTENSIONS)} files (--images=a.jpg,folder/).")
  run = workdir_lib.load_run(workdir)
  readable, images_NxHxWxC, failures = read_images(
      paths, run["image_shape"], host_crop_fraction(run, workdir_lib.load_config(workdir)))
  if readable:
    report_unreadable(paths, readable, failures)
    probs = dict(zip(readable, _probabilities(workdir, which, images_NxHxWxC)))
  results = [{"image": path, "error": failures[path]} if path in failures else
             {"image": path, "top5": top_k(probs[path], run["class_names"])}
             for path in paths]
  if fmt == "json":
    print("\n".join(json.dumps(r) for r in results), flush=True)
  elif readable:
    print(format_table(results), flush=True)
  report_unreadable(paths, readable, failures)
  return results


def report_unreadable(paths: Sequence[str], readable: Sequence[str],
                      failures: dict[str, str]) -> None:
  """Prints why each unreadable file failed (stderr) while some others could be read.

  Raises:
    errors.NoReadableImageError when none could be read: the reason itself for one file,
    after the per-file lines for several.
  """
  if not readable and len(paths) == 1:
    raise errors.NoReadableImageError(failures[paths[0]])
  for error in failures.values():
    print(error, file=sys.stderr, flush=True)
  if not readable:
    raise errors.NoReadableImageError(f"None of the {len(paths)} images could be read.")
