"""Writes the timm reference files of tests/test_references.py (run by hand, not by the suite).

Independent of vit_jax: tiny timm ViTs (width 16, depth 2, 2 heads, MLP 32, patch 4,
16 x 16 px, 5 classes) with random weights, each written as a checkpoint in a published
layout by code that mirrors timm's own big_vision/vision_transformer .npz reader
(`timm.models.vision_transformer._load_weights`) in reverse, and timm's logits for fixed
inputs, computed in float64 from the stored float32 weights. vit_jax must load each file
and give the same logits to float32 rounding.

Every file but two is checked here first by loading it back with timm's `_load_weights`
into a fresh timm model and comparing the logits: the conversion is timm's, not ours. The
two that timm's reader cannot take are checked by the equivalent timm model instead:
  * sincos2d (no table in the file): read with the table added back to a copy;
  * registers (timm's reader skips them): read into a model whose class and register
    tokens carry their position embedding themselves, with the register tokens set by hand.

The files (185 KB, compressed .npz), all in this folder:
  vit_a.npz                  vision_transformer layout (a): class token, learned table
                             with a class-token slot, token pooling
  big_vision_token.npz       big_vision layout (c): params/, linen numbering, top-level
                             pos_embedding without a class-token slot, class token
  big_vision_sincos_gap.npz  big_vision: posemb sincos2d (no table), gap, no class token,
                             pre_logits (rep_size), blocks stacked (layer scan)
  siglip_map.npz             a SigLIP-style two-tower file: the image tower under
                             params/img/ with a MAP head and no class token, beside text-tower
                             keys
  registers.npz              big_vision layout with a class token and 2 register tokens
                             (`registers`, 1 x 2 x D): timm's position embeddings of the
                             class and register tokens folded into the tokens themselves
  timm_logits.npz            the inputs (rgb 2x16x16x3, grey 2x16x16x1) and timm's logits
                             for each file, and for vit_a.npz read by a 1-channel timm model
                             (timm sums the colour kernels: adapt_input_conv) on grey input

Made with: Python 3.11, torch 2.13.0+cpu, timm 1.0.31, numpy 2.4.6:
  python3 -m venv /tmp/timmref && /tmp/timmref/bin/pip install torch==2.13.0 numpy
  /tmp/timmref/bin/pip install --no-deps timm==1.0.31 && /tmp/timmref/bin/pip install \
      pyyaml huggingface_hub safetensors pillow
  /tmp/timmref/bin/python tests/data/make_references.py
timm imports torchvision, which has no CPU wheel here and is not used by these models: an
inert stand-in is registered first.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=2, num_heads=2,
            mlp_ratio=2.0, act_layer="gelu_tanh")  # The published ViTs' tanh GELU.
LINEN = {"attn": "MultiHeadDotProductAttention_0", "ln2": "LayerNorm_1", "mlp": "MlpBlock_0"}
OLD = {"attn": "MultiHeadDotProductAttention_1", "ln2": "LayerNorm_2", "mlp": "MlpBlock_3"}


class _Inert(type):
  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Inert(name, (), {})


class _InertModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Inert(name, (), {})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, fullname, path, target=None):
    if fullname.split(".")[0] == "torchvision":
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    return _InertModule(spec.name)

  def exec_module(self, module):
    module.__path__ = []


sys.meta_path.insert(0, _TorchvisionStandIn())
import timm  # noqa: E402
from timm.models import vision_transformer as timm_vit  # noqa: E402


def make(seed: int, **kwargs) -> torch.nn.Module:
  """A tiny timm ViT with random weights of unit-scale activations (not timm's 0.02 init,
  which would leave logits near 0 and the comparison weak)."""
  torch.manual_seed(seed)
  model = timm_vit.VisionTransformer(**{**TINY, **kwargs})
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      elif name in ("cls_token", "reg_token", "pos_embed", "attn_pool.latent"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  return model.eval()


def logits(model: torch.nn.Module, images_BxHxWxC: np.ndarray, pre_logits=None) -> np.ndarray:
  """float64 logits of the float32 weights; `pre_logits` (a Linear) adds big_vision's
  tanh pre_logits layer between the pooling and the head (timm has none)."""
  model = model.double()
  x = torch.from_numpy(images_BxHxWxC.astype(np.float64)).permute(0, 3, 1, 2)
  with torch.no_grad():
    if pre_logits is None:
      return model(x).numpy()
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.head(torch.tanh(pre_logits.double()(features))).numpy()


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().numpy().copy()


def _dense(linear: torch.nn.Linear) -> dict:
  return {"kernel": _np(linear.weight.T), "bias": _np(linear.bias)}


def _attention(q_w, q_b, k_w, k_b, v_w, v_b, proj: torch.nn.Linear, heads: int) -> dict:
  """flax MultiHeadDotProductAttention parameters from timm's (out, in) matrices: the
  reverse of `_load_weights`' `.flatten(1).T` (q/k/v) and `[2, 0, 1]`-then-flatten (out)."""
  d = proj.weight.shape[0]
  out = {}
  for name, w, b in (("query", q_w, q_b), ("key", k_w, k_b), ("value", v_w, v_b)):
    out[f"{name}/kernel"] = _np(w.T).reshape(d, heads, -1)
    out[f"{name}/bias"] = _np(b).reshape(heads, -1)
  out["out/kernel"] = _np(proj.weight.T).reshape(heads, -1, d)
  out["out/bias"] = _np(proj.bias)
  return out


def _block(block, names: dict, heads: int) -> dict:
  q_w, k_w, v_w = block.attn.qkv.weight.chunk(3)
  q_b, k_b, v_b = block.attn.qkv.bias.chunk(3)
  arrays = {"LayerNorm_0/scale": _np(block.norm1.weight), "LayerNorm_0/bias": _np(block.norm1.bias),
            f"{names['ln2']}/scale": _np(block.norm2.weight),
            f"{names['ln2']}/bias": _np(block.norm2.bias)}
  arrays.update({f"{names['attn']}/{k}": v for k, v in _attention(
      q_w, q_b, k_w, k_b, v_w, v_b, block.attn.proj, heads).items()})
  for i, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
    arrays.update({f"{names['mlp']}/Dense_{i}/{k}": v for k, v in _dense(fc).items()})
  return arrays


def to_arrays(model, *, big_vision: bool, stacked: bool = False) -> dict[str, np.ndarray]:
  """A timm ViT as the flat arrays of a published .npz (without any prefix)."""
  names, heads = (LINEN if big_vision else OLD), model.blocks[0].attn.num_heads
  out = {"embedding/kernel": _np(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
         "embedding/bias": _np(model.patch_embed.proj.bias),
         "Transformer/encoder_norm/scale": _np(model.norm.weight),
         "Transformer/encoder_norm/bias": _np(model.norm.bias),
         "head/kernel": _np(model.head.weight.T), "head/bias": _np(model.head.bias)}
  if model.cls_token is not None:
    out["cls"] = _np(model.cls_token)
  if model.pos_embed is not None:
    out["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = \
        _np(model.pos_embed)
  blocks = [_block(b, names, heads) for b in model.blocks]
  if stacked:
    out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks])
                for k in blocks[0]})
  else:
    out.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks)
                for k, v in b.items()})
  if model.attn_pool is not None:
    pool = model.attn_pool
    k_w, v_w = pool.kv.weight.chunk(2)
    k_b, v_b = pool.kv.bias.chunk(2)
    head = {"probe": _np(pool.latent), "LayerNorm_0/scale": _np(pool.norm.weight),
            "LayerNorm_0/bias": _np(pool.norm.bias)}
    head.update({f"MultiHeadDotProductAttention_0/{k}": v for k, v in _attention(
        pool.q.weight, pool.q.bias, k_w, k_b, v_w, v_b, pool.proj, heads).items()})
    for i, fc in enumerate((pool.mlp.fc1, pool.mlp.fc2)):
      head.update({f"MlpBlock_0/Dense_{i}/{k}": v for k, v in _dense(fc).items()})
    out.update({f"MAPHead_0/{k}": v for k, v in head.items()})
  return out


def sincos2d(height: int, width: int, features: int) -> torch.Tensor:
  """big_vision's posemb_sincos_2d (big_vision/models/vit.py), in float64: x is the column,
  y the row, channels [sin x, cos x, sin y, cos y] with omega = 1 / 10000^(k / (F/4 - 1))."""
  y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                        torch.arange(width, dtype=torch.float64), indexing="ij")
  quarter = features // 4
  omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / (quarter - 1))
  x, y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
  return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None]


def save(name: str, arrays: dict) -> str:
  path = os.path.join(HERE, name)
  with open(path, "wb") as f:  # A file object: np.savez would append ".npz" to a name.
    np.savez_compressed(f, **arrays)  # The reader is the same; 185 KB instead of 200.
  return path


def timm_reads(path: str, images, expected, **kwargs) -> None:
  """The file through timm's own reader into a fresh model gives the expected logits."""
  fresh = make(99, **kwargs)
  timm_vit._load_weights(fresh, path)
  np.testing.assert_allclose(logits(fresh, images), expected, rtol=1e-12, atol=1e-12)


def main() -> None:
  rng = np.random.default_rng(0)
  rgb = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  grey = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
  out = {"images_rgb": rgb, "images_grey": grey}

  model = make(1)  # (a): class token, table with its slot, token pooling.
  out["vit_a"] = logits(model, rgb)
  path = save("vit_a.npz", to_arrays(model, big_vision=False))
  timm_reads(path, rgb, out["vit_a"])
  grey_model = make(2, in_chans=1)
  timm_vit._load_weights(grey_model, path)  # adapt_input_conv: colour kernels summed.
  out["vit_a_grey"] = logits(grey_model, grey)

  kwargs = dict(no_embed_class=True)  # big_vision adds the table before prepending cls.
  model = make(3, **kwargs)
  out["big_vision_token"] = logits(model, rgb)
  path = save("big_vision_token.npz",
              {f"params/{k}": v for k, v in to_arrays(model, big_vision=True).items()})
  timm_reads(path, rgb, out["big_vision_token"], **kwargs)

  kwargs = dict(class_token=False, global_pool="avg", fc_norm=False)
  model = make(4, **kwargs)
  with torch.no_grad():
    model.pos_embed.copy_(sincos2d(4, 4, 16).float())  # Fixed, as big_vision computes it.
  torch.manual_seed(5)
  pre_logits = torch.nn.Linear(16, 16)  # big_vision's rep_size: Dense + tanh.
  out["big_vision_sincos_gap"] = logits(model, rgb, pre_logits)
  arrays = {f"params/{k}": v for k, v in to_arrays(model, big_vision=True, stacked=True).items()}
  table = arrays.pop("params/pos_embedding")
  arrays.update({f"params/pre_logits/{k}": v for k, v in _dense(pre_logits).items()})
  save("big_vision_sincos_gap.npz", arrays)
  with tempfile.TemporaryDirectory() as tmp:  # timm needs the table: check with it put back.
    path = os.path.join(tmp, "with_table.npz")
    np.savez(path, **arrays, **{"params/pos_embedding": table})
    fresh = make(99, **kwargs)
    timm_vit._load_weights(fresh, path)
    np.testing.assert_allclose(logits(fresh, rgb, pre_logits), out["big_vision_sincos_gap"],
                               rtol=1e-12, atol=1e-12)

  kwargs = dict(class_token=False, global_pool="map")
  model = make(6, **kwargs)
  out["siglip_map"] = logits(model, rgb)
  arrays = {f"params/img/{k}": v for k, v in to_arrays(model, big_vision=True).items()}
  arrays.update({"params/txt/Embed_0/embedding": rng.normal(size=(7, 16)).astype(np.float32),
                 "params/t": np.float32([2.3]), "params/b": np.float32([-10.0])})
  path = save("siglip_map.npz", arrays)
  timm_reads(path, rgb, out["siglip_map"], **kwargs)

  kwargs = dict(reg_tokens=2, global_pool="avg", fc_norm=False)  # Table over cls, regs, grid.
  model = make(7, **kwargs)
  out["registers"] = logits(model, rgb)
  arrays = to_arrays(model, big_vision=True)
  table = arrays.pop("pos_embedding")
  arrays["cls"] = arrays["cls"] + table[:, :1]  # Folded: the same sums, token by token.
  arrays["registers"] = _np(model.reg_token) + table[:, 1:3]
  arrays["pos_embedding"] = table[:, 3:]
  path = save("registers.npz", {f"params/{k}": v for k, v in arrays.items()})
  folded = make(99, **kwargs, no_embed_class=True)
  timm_vit._load_weights(folded, path)  # Skips the registers: set here.
  with torch.no_grad():
    folded.reg_token.copy_(torch.from_numpy(arrays["registers"]))
  np.testing.assert_allclose(logits(folded, rgb), out["registers"], rtol=1e-6, atol=1e-7)

  save("timm_logits.npz", out)
  for name in sorted(os.listdir(HERE)):
    if name.endswith(".npz"):
      print(f"{name}: {os.path.getsize(os.path.join(HERE, name))} bytes")
  print(f"timm {timm.__version__}, torch {torch.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
  main()
