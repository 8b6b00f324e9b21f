r"""Pictures of a run: training curves, an image cut into patches, attention maps.

  python main.py --mode=visualize --workdir=DIR [--images=a.jpg,folder/] [--checkpoint=latest]

writes PNG files into DIR/pictures/ (and the image pictures into DIR/tensorboard, beside the
scalars): `training_curves.png`, `confusion_matrix.png` (from --mode=eval's
eval_per_class.json for the same checkpoint, else by evaluating the eval split), and per
image `patches_NAME.png` and `attention_NAME.png`, each map with a colour bar. Without
--images, a few examples of the eval split are drawn. Files are decoded and
preprocessed as `vit_jax.predict` does, i.e. as evaluation does.

Attention maps (on the image as the model sees it, after eval preprocessing):
  - rollout (Abnar & Zuidema 2020): per layer, the heads' mean attention plus the identity
    (the residual connection), rows renormalised; the layers multiplied from the first up;
    the map is the row of the class token (or, without one, the mean over all query
    tokens) over the patch tokens;
  - the last layer's attention per head, read the same way.
Both are normalised to sum to 1 over the patches.

Public API:
  make_pictures(workdir, images, which="best") -> paths written
  plot_training_curves(workdir) -> path; safe to call while training runs (atomic write)
  plot_patches(image_HxWxC, patch_size, path) -> path
  plot_attention(image_HxWxC, rollout_GhxGw, heads_HxGhxGw, title, path) -> path
  confusion_picture(trained, workdir, which) -> path
  attention_rollout(weights, class_token, num_registers=0) -> B x Gh x Gw
  last_layer_head_maps(weights, class_token, num_registers=0) -> B x heads x Gh x Gw
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import ml_collections
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from vit_jax import data, paths
from vit_jax.data import augment
from vit_jax.tools import evaluate, predict
from vit_jax.train import report, workdir as workdir_lib

PANEL_INCHES = 2.5  # Side of one image panel.
MAX_COLUMNS = 6  # Attention figures wrap their head panels onto further rows.
NUM_DATASET_IMAGES = 4  # Eval-split examples drawn when no images are given.
# Images are few and attention weights are layers x heads x tokens^2 each: small batches.
_ATTENTION_BATCH = 8


# --- Attention maths (pure) ------------------------------------------------------------


def attention_rollout(weights: Sequence[np.ndarray], class_token: bool,
                      num_registers: int = 0) -> np.ndarray:
  """Attention rollout over all layers: B x Gh x Gw, each map summing to 1.

  weights: per layer, B x heads x T x T attention (rows sum to 1), first layer first.
  A map is all zeros where no attention reaches the patches (e.g. identity attention
  with a class token: the class token only ever attends to itself).
  """
  rollout_BxTxT = None
  for w_BxHxTxT in weights:
    w_BxHxTxT = np.asarray(w_BxHxTxT, np.float64)
    # The residual connection carries each token on: half attention, half identity.
    a_BxTxT = w_BxHxTxT.mean(axis=1) + np.eye(w_BxHxTxT.shape[-1])
    a_BxTxT /= a_BxTxT.sum(axis=-1, keepdims=True)
    rollout_BxTxT = a_BxTxT if rollout_BxTxT is None else a_BxTxT @ rollout_BxTxT
  if rollout_BxTxT is None:
    raise ValueError("No attention weights: the model has no layers.")
  return _patch_maps(rollout_BxTxT, class_token, num_registers)


def last_layer_head_maps(weights: Sequence[np.ndarray], class_token: bool,
                         num_registers: int = 0) -> np.ndarray:
  """The last layer's attention per head: B x heads x Gh x Gw, each map summing to 1."""
  return _patch_maps(np.asarray(weights[-1], np.float64), class_token, num_registers)


def _patch_maps(attn_xTxT: np.ndarray, class_token: bool, num_registers: int) -> np.ndarray:
  """... x T x T attention -> ... x Gh x Gw over the patch tokens, normalised to sum 1.

  With a class token, its row (where the head reads from); without one, the mean over
  the patch tokens' rows. The tokens are [class token], [registers], patches.
  """
  prefix = int(class_token) + num_registers
  if class_token:
    maps_xN = attn_xTxT[..., 0, prefix:]
  else:
    maps_xN = attn_xTxT[..., prefix:, prefix:].mean(axis=-2)
  total_x1 = maps_xN.sum(axis=-1, keepdims=True)
  maps_xN = maps_xN / np.where(total_x1 > 0, total_x1, 1.0)
  num_patches = maps_xN.shape[-1]
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f"{num_patches} patch tokens do not form a square grid.")
  return maps_xN.reshape(*maps_xN.shape[:-1], side, side)


def upsample(map_GhxGw: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear upsampling of a patch map to image pixels (float32 H x W)."""
  pil = Image.fromarray(np.asarray(map_GhxGw, np.float32))
  return np.asarray(pil.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR))


# --- Figures ------------------------------------------------------------------------


def _show(ax, image_HxWxC: np.ndarray) -> None:
  if image_HxWxC.shape[-1] == 1:
    ax.imshow(image_HxWxC[..., 0], cmap="gray", vmin=0, vmax=255)
  else:
    ax.imshow(image_HxWxC)
  ax.set_axis_off()


def patch_mosaic(image_HxWxC: np.ndarray, patch_size: int) -> np.ndarray:
  """The image's patches as a grid of tiles separated by white gaps."""
  height, width, channels = image_HxWxC.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"A {height}x{width} image does not split into {patch_size}x"
                     f"{patch_size} patches.")
  gap = max(1, patch_size // 4)
  tiles = image_HxWxC.reshape(height // patch_size, patch_size, width // patch_size,
                              patch_size, channels)
  tiles = np.pad(tiles, ((0, 0), (0, gap), (0, 0), (0, gap), (0, 0)), constant_values=255)
  rows, cols = height // patch_size, width // patch_size
  mosaic = tiles.reshape(rows * (patch_size + gap), cols * (patch_size + gap), channels)
  return mosaic[:-gap, :-gap]


def plot_patches(image_HxWxC: np.ndarray, patch_size: int, path: str) -> str:
  """The image beside the same image cut into its patch_size x patch_size patches."""
  height, width, _ = image_HxWxC.shape
  fig = Figure(figsize=(2 * PANEL_INCHES, PANEL_INCHES + 0.4), layout="constrained")
  image_ax, patches_ax = fig.subplots(1, 2)
  _show(image_ax, image_HxWxC)
  image_ax.set_title(f"image {height}x{width}")
  _show(patches_ax, patch_mosaic(image_HxWxC, patch_size))
  patches_ax.set_title(f"{(height // patch_size) * (width // patch_size)} patches of "
                       f"{patch_size}x{patch_size}")
  return report.save_png(fig, path)


def plot_attention(image_HxWxC: np.ndarray, rollout_GhxGw: np.ndarray,
                   heads_HxGhxGw: np.ndarray, title: str, path: str) -> str:
  """The image, its attention rollout and each last-layer head's map, overlaid, each map
  with a colour bar of its scale (`attention_figure`), as a PNG file."""
  return report.save_png(attention_figure(image_HxWxC, rollout_GhxGw, heads_HxGhxGw, title),
                         path)


def attention_figure(image_HxWxC: np.ndarray, rollout_GhxGw: np.ndarray,
                     heads_HxGhxGw: np.ndarray, title: str) -> Figure:
  """The figure of `plot_attention`."""
  panels = [("image", None), ("rollout, all layers", rollout_GhxGw)]
  panels += [(f"last layer, head {h + 1}", m) for h, m in enumerate(heads_HxGhxGw)]
  cols = min(len(panels), MAX_COLUMNS)
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES + 0.6),
               layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  for ax, (name, map_GhxGw) in zip(axes, panels):
    _show(ax, image_HxWxC)
    if map_GhxGw is not None:
      # From 0, not from the map's minimum: a near-uniform map must not look peaked.
      overlay = ax.imshow(upsample(map_GhxGw, image_HxWxC.shape[:2]), cmap="jet", alpha=0.5,
                          vmin=0)
      # The scale of each map: the share of the attention that a patch gets.
      fig.colorbar(overlay, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    ax.set_title(name, fontsize=9)
  for ax in axes[len(panels):]:
    ax.set_axis_off()
  fig.suptitle(title)
  return fig


# --- A workdir's pictures ------------------------------------------------------------


def _file_name(text: str) -> str:
  return re.sub(r"[^\w.-]+", "-", text).strip("-")


def _inputs(trained: workdir_lib.Trained, workdir: str, images: Sequence[str]
            ) -> tuple[list[str], np.ndarray, list[str | None]]:
  """(names, uint8 N x H x W x C at the stored shape, true labels where known)."""
  if images:
    paths = predict.expand_paths(images)
    run = workdir_lib.load_run(workdir)
    readable, images_NxHxWxC, failures = predict.read_images(
        paths, run["image_shape"], predict.host_crop_fraction(run, trained.config))
    predict.report_unreadable(paths, readable, failures)
    names = [f"{i:02d}_{os.path.splitext(os.path.basename(p))[0]}"
             for i, p in enumerate(readable)]
    return names, images_NxHxWxC, [None] * len(readable)
  config = trained.config
  source = data.load_source(config, config.eval_split)
  # Spread over the split, so the pictures show different classes.
  indices = np.unique(np.linspace(0, len(source) - 1, NUM_DATASET_IMAGES).astype(np.int64))
  examples = source.get(indices)
  labels = [trained.class_names[label] for label in examples["label"]]
  names = [f"{config.eval_split.split('[')[0]}_{i}" for i in indices]
  return names, examples["image"], labels


def model_view(trained: workdir_lib.Trained, images_NxHxWxC: np.ndarray) -> np.ndarray:
  """uint8 images as the model sees them: eval preprocessing (crop, resize) undone only
  for the normalisation, so the attention maps line up with the pixels shown."""
  # Photos came cropped from the host (predict.read_image): the device crops no more.
  device_config = data.for_device(trained.config, trained.host_crops)
  aug = ml_collections.ConfigDict({**device_config.aug.to_dict(), "normalize": "minus_one_one"})
  x_NxSxSxC = augment.eval_preprocess(images_NxHxWxC, aug,
                                      image_size=trained.config.image_size,
                                      mean_C=None, std_C=None)
  return np.clip(np.round((np.asarray(x_NxSxSxC) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _add_to_tensorboard(workdir: str, pictures: Sequence[str], step: int) -> None:
  with report.tensorboard_writer(paths.join(workdir, "tensorboard")) as writer:
    for path in pictures:
      with paths.open(path, "rb") as f, Image.open(f) as pil:
        image_HxWxC = np.asarray(pil.convert("RGB"))
      tag = f"pictures/{os.path.splitext(os.path.basename(path))[0]}"
      writer.add_image(tag, image_HxWxC, step, dataformats="HWC")


def confusion_picture(trained: workdir_lib.Trained, workdir: str, which: str) -> str:
  """workdir/pictures/confusion_matrix.png of `trained`'s checkpoint: drawn from the
  eval_per_class.json of `--mode=eval` when that scored this step, else by evaluating
  the run's eval split now (which writes the file)."""
  saved = evaluate.read_per_class(workdir)
  if saved is not None and saved["step"] == trained.step:
    return evaluate.plot_per_class(saved, trained.class_names, workdir)
  return evaluate.evaluate_trained(trained, workdir, which)["confusion_matrix"]


def make_pictures(workdir: str, images: Sequence[str], which: str = "best") -> list[str]:
  """Training curves (when metrics exist), the confusion matrix, and patches and attention
  maps per image.

  Args:
    workdir: a training workdir; pictures go to workdir/pictures/ and TensorBoard.
    images: image files or folders; empty draws a few eval-split examples of the run's
      dataset.
    which: "best" (else the latest) or "latest" checkpoint.

  Returns:
    The paths written.
  """
  written = []
  if report.read_metrics(workdir):
    written.append(report.plot_training_curves(workdir))
  trained = workdir_lib.load_trained(workdir, which)
  written.append(confusion_picture(trained, workdir, which))
  names, images_NxHxWxC, true_labels = _inputs(trained, workdir, images)
  forward = predict.make_forward(trained, attention=True)
  probs_NxK, weights = predict.run_batched(forward, trained.params, images_NxHxWxC,
                                           _ATTENTION_BATCH)
  tokens = (trained.model.class_token, trained.model.num_registers)
  rollout_NxGxG = attention_rollout(weights, *tokens)
  heads_NxHxGxG = last_layer_head_maps(weights, *tokens)
  views_NxSxSxC = model_view(trained, images_NxHxWxC)
  out_dir = report.pictures_dir(workdir)
  image_pictures = []
  for i, name in enumerate(names):
    stem = _file_name(name)
    image_pictures.append(plot_patches(views_NxSxSxC[i], trained.model.patch_size,
                                       paths.join(out_dir, f"patches_{stem}.png")))
    best = int(np.argmax(probs_NxK[i]))
    title = f"{name}: predicted {trained.class_names[best]} ({probs_NxK[i][best]:.1%})"
    if true_labels[i] is not None:
      title += f", true {true_labels[i]}"
    image_pictures.append(plot_attention(views_NxSxSxC[i], rollout_NxGxG[i],
                                         heads_NxHxGxG[i], title,
                                         paths.join(out_dir, f"attention_{stem}.png")))
  _add_to_tensorboard(workdir, image_pictures, trained.step)
  written += image_pictures
  print("\n".join(written), flush=True)
  return written
