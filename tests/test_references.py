"""Published layouts and model variants against timm, an independent implementation.

tests/data/make_references.py (run by hand with torch and timm; see its docstring) wrote
small checkpoints in the vision_transformer, big_vision and SigLIP layouts from random timm
ViTs, checked each one through timm's own .npz reader, and stored timm's logits. Here
vit_jax loads the same files with `config.init_from` and must give the same logits to
float32 rounding, on both kernel paths.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import config as config_lib, errors, models
from vit_jax.train import pretrained

DATA = pathlib.Path(__file__).parent / "data"
TINY = dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4)
SLOT = "Transformer/posembed_input/pos_embedding[class-token slot]"
# File -> the VisionTransformer fields of the timm model that wrote it.
CASES = {
    "vit_a": {},
    "big_vision_token": {},
    "big_vision_sincos_gap": dict(posemb="sincos2d", pool="gap", class_token=False,
                                  representation_size=16),
    "siglip_map": dict(pool="map", class_token=False),
    "registers": dict(num_registers=2, pool="gap"),
}


@pytest.fixture(scope="module")
def timm_logits():
  with np.load(DATA / "timm_logits.npz") as npz:
    return {k: npz[k] for k in npz.files}


def _load(name, channels=3, **fields):
  """A tiny model of `fields`, its parameters from DATA/name.npz, and the report."""
  model = models.create_model("ViT-Ti/4", num_classes=5, **TINY, **fields)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, channels)), train=False))["params"]
  rng = np.random.default_rng(0)  # Random, not zeros: a value not loaded shows in the logits.
  fresh = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(scale=0.5, size=s.shape).astype(s.dtype)), shapes)
  config = config_lib.get_base_config()
  config.init_from = str(DATA / f"{name}.npz")
  config.init_head = "keep"
  config.init_pre_logits = "keep" if fields.get("representation_size") else "drop"
  params, report = pretrained.load_params(config, fresh)
  return model, params, report


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_timms(timm_logits, name, kernels):
  scan = name == "big_vision_sincos_gap"  # Its blocks are stacked in the file.
  model, params, report = _load(name, kernels=kernels, scan_layers=scan, **CASES[name])
  logits = model.apply({"params": params}, timm_logits["images_rgb"], train=False)
  expected = timm_logits[name]
  assert np.abs(expected).max() > 0.5  # A real signal, not zeros.
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=2e-6)
  assert not report.missing and not report.reinitialised and not report.resampled


def test_what_each_layout_reports():
  _, _, report = _load("big_vision_token")
  assert "params/' prefix" in report.source and "without a class-token slot" in report.source
  assert report.adapted == {SLOT: "zero: the file's table has no class-token slot, as "
                                  "big_vision adds none to the class token"}
  _, _, report = _load("siglip_map", **CASES["siglip_map"])
  assert "'params/img/' prefix" in report.source
  assert report.unexpected == {k: "outside the 'params/img/' parameter tree"
                               for k in ("params/txt/Embed_0/embedding", "params/t",
                                         "params/b")}
  assert {n for n in report.loaded if n.startswith("MAPHead_0/")} == {
      "MAPHead_0/probe", "MAPHead_0/LayerNorm_0/scale", "MAPHead_0/LayerNorm_0/bias",
      *(f"MAPHead_0/MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")),
      *(f"MAPHead_0/MultiHeadDotProductAttention_0/{m}/{p}"
        for m in ("query", "key", "value", "out") for p in ("kernel", "bias"))}
  _, _, report = _load("registers", **CASES["registers"])
  assert "registers" in report.loaded and SLOT in report.adapted
  _, _, report = _load("big_vision_sincos_gap", **CASES["big_vision_sincos_gap"])
  assert "stacked (scanned) blocks" in report.source
  assert "pre_logits/kernel" in report.loaded


def test_rgb_checkpoint_on_grey_images_equals_timms_adaptation(timm_logits):
  # timm's reader, given a 1-channel model, sums the colour kernels (adapt_input_conv).
  model, params, report = _load("vit_a", channels=1)
  assert params["embedding"]["kernel"].shape == (4, 4, 1, 16)
  logits = model.apply({"params": params}, timm_logits["images_grey"], train=False)
  np.testing.assert_allclose(np.asarray(logits), timm_logits["vit_a_grey"], rtol=1e-5,
                             atol=2e-6)
  assert report.adapted == {"embedding/kernel": "3 -> 1 input channels (colour kernels "
                                                "summed, as timm's adapt_input_conv)"}
  # The same as the RGB model on the grey image given as 3 equal channels.
  rgb_model, rgb_params, _ = _load("vit_a")
  as_rgb = np.repeat(timm_logits["images_grey"], 3, axis=-1)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(
      rgb_model.apply({"params": rgb_params}, as_rgb, train=False)), rtol=1e-5, atol=2e-6)


def test_loading_a_big_vision_file_into_the_wrong_variant_says_which_setting():
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"missing from the file: Transformer/posembed_input/pos_embedding: "
                           r"a file without a position-embedding table comes from big_vision's "
                           r"posemb='sincos2d': set config.model.overrides.posemb='sincos2d'"):
    _load("big_vision_sincos_gap", pool="gap", class_token=False, representation_size=16)
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"the file has a learned table, the model computes sincos2d ones: "
                           r"set config.model.overrides.posemb='learned'"):
    _load("vit_a", posemb="sincos2d")
