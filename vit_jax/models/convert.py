"""Published ViT parameter layouts -> our parameter tree, and back (for export).

A `.npz` of published ViT checkpoints comes in one of these layouts:
  (a) vision_transformer: '/'-joined Flax paths, old child numbering (our names);
  (b) the same under an `opt/target/` prefix;
  (c) big_vision: a `params/` prefix, linen child numbering (`LayerNorm_0`,
      `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`), a top-level
      `pos_embedding` without a class-token slot (none at all with posemb="sincos2d"),
      blocks possibly stacked under `Transformer/encoderblock` with a leading depth axis
      (layer scan), and with pool_type="map" a `MAPHead_0` (probe, attention, LayerNorm,
      MLP);
  (d) big_vision's two-tower files (SigLIP, LiT): layout (c) of the image tower under
      `params/img/`; the text tower and the other keys are reported unused.
Our own checkpoints, flattened, are layout (a) or (a) stacked, with `registers` (1 x R x D)
beside `cls` when the model has register tokens.

Every source is first brought to one canonical form, our unscanned names
(`Transformer/encoderblock_{i}/...`), matched against the model's parameters in that form,
then stacked again when the model uses `scan_layers=True`; reports use canonical names.

Adapting to the new task (`match`):
  * head: a new zero head (kernel and bias) when the shape differs, when the file's head
    reads a pre_logits layer that is dropped, or `init_head == "reset"`; "keep" with
    another class count or a dropped pre_logits layer is an error;
  * pre_logits: dropped unless `init_pre_logits == "keep"`;
  * position embedding: the patch grid is resampled bilinearly with corners aligned
    (`scipy.ndimage.zoom(order=1)`, the convention of both published loaders, so fine-tuned
    numbers stay comparable with theirs); the class-token slot is kept as it is, or is
    zero when the file has none (big_vision adds no position embedding to the class
    token, so zero is the exact equivalent);
  * input channels: an RGB patch kernel for a greyscale model is summed over the colours
    (timm's adapt_input_conv), a greyscale one for an RGB model repeated and divided by 3;
  * cls, registers, MAP head: kept fresh when the file has none.
Every adaptation is reported. Missing parameters the model needs, and shapes that cannot
be adapted (another width or depth layout), are `CheckpointMismatchError`s that name the
parameters and both shapes.

  new_params, report = convert.match(read_npz(path), params, init_head="auto",
                                     init_pre_logits="drop", source="path.npz")
  arrays = convert.published_arrays(params)   # layout (a), for np.savez
"""
from __future__ import annotations

import dataclasses
import math
import re
import zipfile
from typing import Any

import jax
import numpy as np
import scipy.ndimage

from vit_jax import errors, parallel, paths

PyTree = Any

POSEMB = "Transformer/posembed_input/pos_embedding"
_STACKED = "Transformer/encoderblock/"  # Layer-scan blocks: leading depth axis.
# "params/img/": the image tower of big_vision's two-tower (SigLIP, LiT) files.
_PREFIXES = ("opt/target/", "params/img/", "params/")
# Linen numbering of the block's children -> the old numbering that our model uses.
# The two sets of names are disjoint, so renaming needs no detection of the layout.
_LINEN_TO_OLD = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                 "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_BLOCK_CHILD = re.compile(r"(Transformer/encoderblock_\d+/)([^/]+)(/.+)")
_SLOT = f"{POSEMB}[class-token slot]"
_EMBEDDING = "embedding/kernel"
_HEAD = ("head/kernel", "head/bias")
_NAMES_SHOWN = 12  # Per report line; to_dict() carries every name.


@dataclasses.dataclass
class LoadReport:
  """What `match` did, in canonical (unscanned) parameter names."""
  source: str  # The file or checkpoint folder read, and its layout.
  loaded: list[str] = dataclasses.field(default_factory=list)  # Values from the file.
  reinitialised: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> reason.
  resampled: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> how.
  # Values computed exactly from the file's (input channels, a missing slot): name -> how.
  adapted: dict[str, str] = dataclasses.field(default_factory=dict)
  missing: list[str] = dataclasses.field(default_factory=list)  # In the model, not the file.
  unexpected: dict[str, str] = dataclasses.field(default_factory=dict)  # In the file, unused.

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def format(self) -> str:
    lines = [f"Initialised from {self.source}:", f"  loaded: {len(self.loaded)} parameters"]
    for title, entries in (("resampled", self.resampled), ("adapted", self.adapted),
                           ("re-initialised", self.reinitialised),
                           ("unexpected (in the file, not used)", self.unexpected)):
      if entries:
        lines.append(f"  {title}:")
        lines += [f"    {name}: {why}" for name, why in list(entries.items())[:_NAMES_SHOWN]]
        if len(entries) > _NAMES_SHOWN:
          lines.append(f"    ... and {len(entries) - _NAMES_SHOWN} more")
    if self.missing:
      lines.append(f"  missing from the file (re-initialised above): {', '.join(self.missing)}")
    return "\n".join(lines)


# --- Reading -------------------------------------------------------------------------------


def flatten(tree: PyTree) -> dict[str, Any]:
  """{"Transformer/encoderblock_0/.../kernel": leaf, ...} of a parameter tree."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The named arrays of a .npz file (local, or on an object store: `vit_jax.paths`)."""
  try:
    with paths.open(path, "rb") as f:
      return _read_npz(f, path)
  except FileNotFoundError as e:
    raise errors.MissingCheckpointError(f"{path} does not exist.") from e


def _read_npz(f, path: str) -> dict[str, np.ndarray]:
  try:
    npz = np.load(f, allow_pickle=False)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise errors.NotACheckpointError(
        f"{path} is not a NumPy .npz file ({type(e).__name__}: {e}); "
        "config.init_from takes a published-format .npz, a workdir of ours "
        "or one of its checkpoint folders.") from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise errors.NotACheckpointError(
        f"{path} holds a single array, not a .npz of named parameters.")
  with npz:
    return {key: npz[key] for key in npz.files}


@dataclasses.dataclass
class _Source:
  arrays: dict[str, np.ndarray]  # Canonical names.
  posemb_has_slot: bool  # Whether pos_embedding starts with a class-token slot.
  outside: dict[str, str]  # Keys outside the parameter tree -> why unused.
  layout: str


def _unstack(flat: dict[str, Any], take=lambda value, i: value[i]) -> dict[str, Any]:
  """Transformer/encoderblock/X of shape (depth, ...) -> Transformer/encoderblock_{i}/X."""
  out = {}
  for key, value in flat.items():
    if key.startswith(_STACKED):
      rest = key[len(_STACKED):]
      out.update({f"Transformer/encoderblock_{i}/{rest}": take(value, i)
                  for i in range(value.shape[0])})
    else:
      out[key] = value
  return out


def _canonical(flat: dict[str, np.ndarray]) -> _Source:
  """Any accepted layout -> our unscanned names with the old child numbering."""
  notes, outside = [], {}
  prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in flat)), "")
  if prefix:
    notes.append(f"'{prefix}' prefix")
    outside = {k: f"outside the '{prefix}' parameter tree" for k in flat
               if not k.startswith(prefix)}
    flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  if any(k.startswith(_STACKED) for k in flat):
    notes.append("stacked (scanned) blocks")
    flat = _unstack(flat)
  renamed = {}
  for key, value in flat.items():
    match = _BLOCK_CHILD.fullmatch(key)
    if match and match[2] in _LINEN_TO_OLD:
      key = match[1] + _LINEN_TO_OLD[match[2]] + match[3]
    renamed[key] = value
  if renamed.keys() != flat.keys():
    notes.append("linen numbering")
  # vision_transformer (and our) tables hold a class-token slot exactly when there is a
  # class token; big_vision adds its top-level table before prepending cls: no slot,
  # except in its files from before 2022 (a square grid + 1, as fix_old_checkpoints says).
  has_slot = "cls" in renamed
  if "pos_embedding" in renamed:
    renamed[POSEMB] = renamed.pop("pos_embedding")
    tokens = renamed[POSEMB].shape[1] if renamed[POSEMB].ndim == 3 else 0
    has_slot = has_slot and math.isqrt(tokens) ** 2 != tokens
    notes.append(f"top-level pos_embedding {'with' if has_slot else 'without'} a class-token "
                 "slot")
  layout = "layout: " + (", ".join(notes) if notes else "published names")
  return _Source(renamed, has_slot, outside, layout)


# --- Matching the model ---------------------------------------------------------------


def _shape(x) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def _square_side(num_tokens: int, what: str) -> int:
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise errors.CheckpointMismatchError(
        f"{POSEMB}: the {what} has {num_tokens} grid positions, not a square grid; the "
        "grid shape cannot be inferred (resample it with resample_posemb_grid first).")
  return side


def resample_posemb_grid(grid_HxWxD: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resampling of a position-embedding grid, corners aligned.

  scipy.ndimage.zoom(order=1), as the vision_transformer and big_vision loaders do: the
  corner embeddings stay where they are and a field linear in the position is
  reproduced exactly; grids need not be square.
  """
  h, w, _ = grid_HxWxD.shape
  out = scipy.ndimage.zoom(grid_HxWxD, (new_hw[0] / h, new_hw[1] / w, 1), order=1)
  assert out.shape[:2] == tuple(new_hw), (out.shape, new_hw)
  return out


class _Matcher:
  """Fills the model's canonical parameters from the file's, recording every decision."""

  def __init__(self, source: _Source, target: dict[str, Any], init_head: str,
               init_pre_logits: str, report: LoadReport):
    self.src, self.target, self.report = source, target, report
    self.init_head, self.init_pre_logits = init_head, init_pre_logits
    self.used: set[str] = set()
    self.errors: list[str] = []
    self.values: dict[str, np.ndarray | None] = {}  # None: keep the model's fresh value.

  def load(self, name: str) -> None:
    if name not in self.src.arrays:
      self.report.missing.append(name)
      self.errors.append(f"missing from the file: {name} {_shape(self.target[name])}")
      return
    self.used.add(name)
    value = self.src.arrays[name]
    file_shape, model_shape = _shape(value), _shape(self.target[name])
    if name == _EMBEDDING and file_shape != model_shape and len(model_shape) == 4:
      value = self._adapt_channels(value, model_shape)
    if _shape(value) != model_shape:
      self.errors.append(f"shape mismatch: {name}: file {file_shape} vs model {model_shape}")
      return
    self.values[name] = np.asarray(value, self.target[name].dtype)
    self.report.loaded.append(name)

  def _adapt_channels(self, kernel_PxPxCxD: np.ndarray, model_shape: tuple[int, ...]):
    """The patch kernel for another input channel count, where an exact equivalent exists.

    3 -> 1: summed over the colours (timm's adapt_input_conv), so a grey image gives the
    logits the RGB checkpoint gives it as 3 equal channels. 1 -> 3: repeated and divided
    by 3, so an RGB image gives the grey checkpoint's logits for its channel mean.
    Other shapes are returned as they are (a shape mismatch for the caller).
    """
    file_c, model_c = kernel_PxPxCxD.shape[2], model_shape[2]
    same_otherwise = (_shape(kernel_PxPxCxD)[:2] + _shape(kernel_PxPxCxD)[3:]
                      == model_shape[:2] + model_shape[3:])
    if not same_otherwise or (file_c, model_c) not in ((3, 1), (1, 3)):
      return kernel_PxPxCxD
    kernel = np.asarray(kernel_PxPxCxD, np.float64)
    if model_c == 1:
      how = "3 -> 1 input channels (colour kernels summed, as timm's adapt_input_conv)"
      kernel = kernel.sum(axis=2, keepdims=True)
    else:
      how = "1 -> 3 input channels (repeated and divided by 3: the grey model on the mean)"
      kernel = np.repeat(kernel / 3.0, 3, axis=2)
    self.report.adapted[_EMBEDDING] = how
    return kernel

  def keep_fresh(self, name: str, reason: str) -> None:
    if name not in self.src.arrays:
      self.report.missing.append(name)
    self.values[name] = None
    self.report.reinitialised[name] = reason

  def unused(self, module: str, reason: str) -> None:
    """Marks the file's arrays of top-level `module` as deliberately not used."""
    for name in self.src.arrays:
      if name.split("/")[0] == module and name not in self.used:
        self.used.add(name)
        self.report.unexpected[name] = reason

  def head(self) -> None:
    model_shape = _shape(self.target["head/kernel"])
    file_kernel = self.src.arrays.get("head/kernel")
    file_shape = None if file_kernel is None else _shape(file_kernel)
    mode = self.init_head
    # A head trained on the file's tanh pre_logits layer means nothing without it.
    reads_dropped = ("pre_logits/kernel" in self.src.arrays
                     and self.init_pre_logits == "drop")
    if mode == "keep":
      if reads_dropped:
        raise errors.CheckpointMismatchError(
            "config.init_head='keep' but the file's head reads its pre_logits layer, which "
            "config.init_pre_logits='drop' drops: set config.init_pre_logits='keep' (and "
            "config.model.overrides.representation_size="
            f"{self.src.arrays['pre_logits/kernel'].shape[-1]}), or init_head='reset'.")
      if file_shape is not None and file_shape != model_shape:
        raise errors.CheckpointMismatchError(
            f"config.init_head='keep' but the file's head/kernel is {file_shape} and the "
            f"model's {model_shape}: the class counts differ ({file_shape[-1]} vs "
            f"{model_shape[-1]}). Use init_head='auto' or 'reset' for a new head.")
      for name in _HEAD:
        self.load(name)
      return
    if mode == "reset":
      reason = "config.init_head='reset'"
    elif file_shape is None:
      reason = "no head in the file"
    elif file_shape != model_shape:
      reason = f"head shape differs (file {file_shape}, model {model_shape})"
    elif reads_dropped:
      reason = "the file's head reads its pre_logits layer, which is dropped"
    else:
      for name in _HEAD:
        self.load(name)
      return
    for name in _HEAD:
      if name not in self.src.arrays:
        self.report.missing.append(name)
      self.values[name] = np.zeros(_shape(self.target[name]), self.target[name].dtype)
      self.report.reinitialised[name] = f"{reason}: new zero head"
    self.unused("head", "replaced by a new head")

  def pre_logits(self) -> None:
    names = [n for n in self.target if n.startswith("pre_logits/")]
    if self.init_pre_logits == "keep":
      if not names:
        file_kernel = self.src.arrays.get("pre_logits/kernel")
        size = "N" if file_kernel is None else file_kernel.shape[-1]
        raise errors.CheckpointMismatchError(
            "config.init_pre_logits='keep' needs a model with a pre_logits layer: set "
            f"config.model.overrides.representation_size={size}.")
      for name in names:
        self.load(name)
      return
    for name in names:
      self.keep_fresh(name, "config.init_pre_logits='drop'")
    self.unused("pre_logits", "dropped (config.init_pre_logits='drop')")

  def optional(self, module: str, model_lacks: str, file_lacks: str) -> None:
    """A top-level module (cls, registers, MAPHead_0) that either side may lack: loaded
    when both have it, kept fresh when the file lacks it, unused when the model does."""
    names = [n for n in self.target if n.split("/")[0] == module]
    if not names:
      self.unused(module, model_lacks)
    elif not any(n in self.src.arrays for n in names):
      for name in names:
        self.keep_fresh(name, file_lacks)

  def posemb(self) -> None:
    """The patch grid from the file, resampled if needed; a zero class-token slot when the
    file has none (big_vision adds no position embedding to the class token)."""
    if POSEMB not in self.target:  # posemb="sincos2d": the model computes its table.
      if POSEMB in self.src.arrays:
        self.used.add(POSEMB)
        self.errors.append(f"{POSEMB}: the file has a learned table, the model computes "
                           "sincos2d ones: set config.model.overrides.posemb='learned'")
      return
    if POSEMB not in self.src.arrays:
      self.report.missing.append(POSEMB)
      self.errors.append(
          f"missing from the file: {POSEMB}: a file without a position-embedding table "
          "comes from big_vision's posemb='sincos2d': set "
          "config.model.overrides.posemb='sincos2d'")
      return
    self.used.add(POSEMB)
    file_1xNxD = np.asarray(self.src.arrays[POSEMB])
    model_shape = _shape(self.target[POSEMB])
    model_slot = int("cls" in self.target)
    file_slot = int(self.src.posemb_has_slot)
    if file_1xNxD.ndim != 3 or file_1xNxD.shape[-1] != model_shape[-1]:
      self.errors.append(f"shape mismatch: {POSEMB}: file {_shape(file_1xNxD)} vs model "
                         f"{model_shape}")
      return
    grid_1xGxD = file_1xNxD[:, file_slot:]
    old_side = _square_side(grid_1xGxD.shape[1], "file")
    new_side = _square_side(model_shape[1] - model_slot, "model")
    if old_side != new_side:
      grid_1xGxD = resample_posemb_grid(
          grid_1xGxD.reshape(old_side, old_side, -1), (new_side, new_side)
      ).reshape(1, new_side * new_side, -1)
      self.report.resampled[POSEMB] = (
          f"grid {old_side}x{old_side} -> {new_side}x{new_side} (bilinear, corners "
          "aligned: scipy.ndimage.zoom order=1)")
    if model_slot and file_slot:
      slot_1xSxD = file_1xNxD[:, :1]
    elif model_slot:
      slot_1xSxD = np.zeros_like(file_1xNxD[:, :1])
      self.report.adapted[_SLOT] = ("zero: the file's table has no class-token slot, as "
                                    "big_vision adds none to the class token")
    else:
      slot_1xSxD = file_1xNxD[:, :0]
      if file_slot:
        self.report.unexpected[_SLOT] = "the model has no class token"
    dtype = self.target[POSEMB].dtype
    self.values[POSEMB] = np.concatenate([slot_1xSxD, grid_1xGxD], axis=1).astype(dtype)
    self.report.loaded.append(POSEMB)


def _canonical_target(flat: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's parameter shapes under canonical (unscanned) names."""
  shapes = {k: jax.ShapeDtypeStruct(_shape(v), v.dtype) for k, v in flat.items()}
  return _unstack(shapes, lambda s, _: jax.ShapeDtypeStruct(s.shape[1:], s.dtype))


def _restack(values: dict[str, np.ndarray | None], key: str, leaf) -> np.ndarray | None:
  """A model parameter's new value from canonical values (stacked under layer scan)."""
  if not key.startswith(_STACKED):
    return values[key]
  rest = key[len(_STACKED):]
  return np.stack([values[f"Transformer/encoderblock_{i}/{rest}"]
                   for i in range(leaf.shape[0])])


def _place(value: np.ndarray | None, leaf):
  """`value` with `leaf`'s sharding (or `leaf` itself when the value is kept)."""
  if value is None:
    return leaf
  if isinstance(leaf, jax.Array):
    return jax.make_array_from_callback(value.shape, leaf.sharding, lambda idx: value[idx])
  return value


def match(flat: dict[str, np.ndarray], params: PyTree, *, init_head: str = "auto",
          init_pre_logits: str = "drop", source: str = "") -> tuple[PyTree, LoadReport]:
  """`params` (a freshly initialised model) with the values of `flat` (a file's arrays).

  `init_head` ("auto", "reset", "keep") and `init_pre_logits` ("drop", "keep") as the
  config keys of those names; `source` names the file in the report. Returns the new
  params (same tree, shardings and dtypes) and the report. Raises CheckpointMismatchError
  for missing parameters or unresolvable shapes.
  """
  canonical = _canonical(flat)
  report = LoadReport(source=f"{source}, {canonical.layout}")
  model_flat = flatten(params)
  target = _canonical_target(model_flat)
  matcher = _Matcher(canonical, target, init_head, init_pre_logits, report)
  matcher.head()
  matcher.pre_logits()
  matcher.optional("cls", "the model has no class token", "no class token in the file")
  matcher.optional("registers", "the model has no register tokens "
                   "(config.model.overrides.num_registers)", "no register tokens in the file")
  matcher.optional("MAPHead_0", "the model does not pool with a MAP head "
                   "(config.model.overrides.pool='map')", "no MAP head in the file: a new one")
  matcher.posemb()
  for name in target:
    if name not in matcher.values and name not in report.missing:
      matcher.load(name)
  for name in canonical.arrays:
    if name not in matcher.used:
      report.unexpected[name] = "not in the model"
  report.unexpected.update(canonical.outside)
  if matcher.errors:
    unused = [n for n, why in report.unexpected.items() if why == "not in the model"]
    hint = (f"\nFile keys not used: {', '.join(unused[:_NAMES_SHOWN])}"
            f"{' ...' if len(unused) > _NAMES_SHOWN else ''}" if unused else "")
    raise errors.CheckpointMismatchError(
        f"Cannot initialise the model from {report.source}:\n  "
        + "\n  ".join(matcher.errors) + hint)
  new_params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _place(_restack(
          matcher.values, jax.tree_util.keystr(path, simple=True, separator="/"), leaf),
          leaf), params)
  return new_params, report


def published_arrays(params: PyTree) -> dict[str, np.ndarray]:
  """params as the arrays of a published-format .npz (layout (a)) on this host.

  Keys are '/'-joined paths in our (old-numbering) names, scanned blocks unstacked into
  encoderblock_{i}, so vision_transformer-style loaders read them directly. Every process
  must call it (gathering an array sharded over hosts is a collective).
  """
  return _unstack({k: parallel.to_host(v) for k, v in flatten(params).items()})
