"""Fine-tuning initialisation: published .npz layouts, our checkpoints, adaptation, export."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import config as config_lib, errors, models
from vit_jax.configs import finetune
from vit_jax.models import convert
from vit_jax.tools import export
from vit_jax.train import checkpoints, pretrained, state as state_lib

TINY = dict(depth=2, width=32, num_heads=2, mlp_dim=64)
POSEMB = "Transformer/posembed_input/pos_embedding"
SLOT = POSEMB + "[class-token slot]"
LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
         "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def _model(num_classes=5, **overrides):
  return models.create_model("ViT-Ti/4", num_classes=num_classes, **{**TINY, **overrides})


def _init(model, size=16, seed=1):
  """Random parameters of the model's shapes, as device arrays (no compiled init: fast)."""
  shapes = jax.eval_shape(lambda: state_lib.init_params(model, 0, (size, size, 3)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(scale=0.5, size=s.shape).astype(s.dtype)), shapes)


def _images(size=16):
  return jax.random.normal(jax.random.key(7), (2, size, size, 3))


def _config(path, **fields):
  config = config_lib.get_base_config()
  config.init_from = str(path)
  for key, value in fields.items():
    config[key] = value
  return config


def _published(params, tmp_path, name="params.npz"):
  """params as the flat dict of a layout-(a) file (export_npz, read back)."""
  path = tmp_path / name
  export.export_npz(params, str(path))
  with np.load(path) as npz:
    return {k: npz[k] for k in npz.files}


def _save_npz(arrays, path):
  np.savez(path, **arrays)
  return path


@pytest.fixture(scope="module")
def source():
  """A 16 px, 5-class model whose every parameter (head and cls included) is non-zero."""
  model = _model()
  return model, _init(model, seed=0)


def test_export_names_what_the_published_loaders_lack():
  from vit_jax.configs import cifar100, finetune
  assert export.beyond_published_loaders(finetune.get_config("model=ViT-B/16")) == []
  assert export.beyond_published_loaders(cifar100.get_config("keras")) == [
      "hidden head layers (head_hidden_dims=(2048, 1024)): neither has them",
      "GELU after each block's second MLP layer (mlp_activate_output=True): neither has it",
      "a head on all tokens flattened (pool='flatten'): neither has one",
      "inputs normalised with aug.normalize='dataset' (the training set's mean and std, in "
      "run.json), where the published models take [-1, 1]"]
  config = finetune.get_config("model=ViT-B/16")
  config.model.overrides.num_registers, config.model.overrides.representation_size = 4, 768
  config.aug.normalize = "imagenet"
  assert export.beyond_published_loaders(config) == [
      "register tokens (num_registers=4): timm's reader skips them, vision_transformer has "
      "none",
      "a pre_logits layer (representation_size=768): timm has none",
      "inputs normalised with aug.normalize='imagenet' (ImageNet's mean and std), where the "
      "published models take [-1, 1]"]


def test_export_round_trip_gives_identical_logits(tmp_path, source):
  model, params = source
  path = tmp_path / "vit.npz"
  assert export.export_npz(params, str(path)) == 40
  assert not [n for n in os.listdir(tmp_path) if n != "vit.npz"]  # No temporary left.
  with np.load(path) as npz:
    assert npz[f"{POSEMB}"].shape == (1, 17, 32)
    assert npz["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape \
        == (32, 2, 16)
  loaded, report = pretrained.load_params(_config(path), _init(model))
  assert len(report.loaded) == 40
  assert not (report.reinitialised or report.resampled or report.missing or report.unexpected)
  np.testing.assert_array_equal(model.apply({"params": loaded}, _images(), train=False),
                                model.apply({"params": params}, _images(), train=False))


def _layout(arrays, layout):
  """Layout-(a) arrays rewritten as layout b (opt/target/), c (big_vision) or c_scan."""
  if layout == "a":
    return dict(arrays)
  if layout == "b":
    return {"opt/target/" + k: v for k, v in arrays.items()} | {"opt/state/step": np.ones(())}
  out = {}
  for key, value in arrays.items():
    if key == POSEMB:
      out["pos_embedding"] = value[:, 1:]  # big_vision: no class-token slot.
      continue
    match = re.fullmatch(r"(Transformer/encoderblock_\d+/)([^/]+)(/.+)", key)
    out[match[1] + LINEN.get(match[2], match[2]) + match[3] if match else key] = value
  if layout == "c_scan":
    blocks = sorted(k for k in out if k.startswith("Transformer/encoderblock_0/"))
    for key in blocks:
      rest = key[len("Transformer/encoderblock_0/"):]
      out["Transformer/encoderblock/" + rest] = np.stack(
          [out.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(TINY["depth"])])
  return {"params/" + k: v for k, v in out.items()}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("layout", ["a", "b", "c", "c_scan"])
def test_every_layout_loads(tmp_path, source, layout, scan):
  _, params = source
  expected = _published(params, tmp_path, "expected.npz")
  path = _save_npz(_layout(expected, layout), tmp_path / f"{layout}.npz")
  target = _init(_model(scan_layers=scan))
  loaded, report = pretrained.load_params(_config(path), target)
  got = _published(loaded, tmp_path, "got.npz")
  assert got.keys() == expected.keys()
  for key in expected:
    if key != POSEMB:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  np.testing.assert_array_equal(got[POSEMB][:, 1:], expected[POSEMB][:, 1:])
  if layout.startswith("c"):
    # No slot in the file (big_vision adds no position embedding to the class token): zero,
    # the exact equivalent, whatever the model's fresh value; reported.
    assert np.abs(_published(target, tmp_path, "target.npz")[POSEMB][:, :1]).min() > 0
    np.testing.assert_array_equal(got[POSEMB][:, :1], np.zeros((1, 1, 32), np.float32))
    assert SLOT in report.adapted
  else:
    np.testing.assert_array_equal(got[POSEMB][:, :1], expected[POSEMB][:, :1])
    assert not report.adapted
  assert not report.reinitialised
  assert set(report.unexpected) == ({"opt/state/step"} if layout == "b" else set())
  assert not report.missing


def test_scanned_model_loads_to_the_same_function(tmp_path, source):
  model, params = source
  path = tmp_path / "a.npz"
  export.export_npz(params, str(path))
  scanned = _model(scan_layers=True)
  loaded, _ = pretrained.load_params(_config(path), _init(scanned))
  assert loaded["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (2, 32)
  np.testing.assert_allclose(scanned.apply({"params": loaded}, _images(), train=False),
                             model.apply({"params": params}, _images(), train=False),
                             rtol=1e-5, atol=1e-5)


def _linear_field(h, w, coef_i, coef_j, offset):
  i, j = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                     indexing="ij")
  return i[..., None] * coef_i + j[..., None] * coef_j + offset


def test_resolution_change_resamples_the_grid_and_keeps_the_slot(tmp_path, source):
  _, params = source
  arrays = _published(params, tmp_path)
  rng = np.random.default_rng(0)
  coef_i, coef_j, offset = (rng.normal(size=32).astype(np.float32) for _ in range(3))
  coef_i[:8] = coef_j[:8] = 0.0  # Channels 0-7: a constant field must stay constant.
  slot_1x1xD = arrays[POSEMB][:, :1]
  grid_4x4xD = _linear_field(4, 4, coef_i, coef_j, offset)
  arrays[POSEMB] = np.concatenate([slot_1x1xD, grid_4x4xD.reshape(1, 16, 32)], axis=1)
  path = _save_npz(arrays, tmp_path / "16px.npz")

  loaded, report = pretrained.load_params(_config(path), _init(_model(), size=32))
  posemb_1xNxD = np.asarray(loaded["Transformer"]["posembed_input"]["pos_embedding"])
  assert posemb_1xNxD.shape == (1, 65, 32)
  np.testing.assert_array_equal(posemb_1xNxD[:, :1], slot_1x1xD)
  grid_8x8xD = posemb_1xNxD[0, 1:].reshape(8, 8, 32)
  # Corners aligned: new position k sits at old position k * 3 / 7, edges included.
  np.testing.assert_allclose(grid_8x8xD, _linear_field(8, 8, coef_i * 3 / 7, coef_j * 3 / 7,
                                                       offset), atol=1e-5)
  np.testing.assert_array_equal(grid_8x8xD[..., :8], np.broadcast_to(offset[:8], (8, 8, 8)))
  assert "4x4 -> 8x8" in report.resampled[POSEMB]
  assert POSEMB in report.loaded and len(report.loaded) == 40
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], arrays["embedding/kernel"])


@pytest.mark.parametrize("old_hw,new_hw", [((3, 5), (6, 4)), ((6, 4), (2, 3))])
def test_resampling_non_square_grids_is_exact_for_linear_fields(old_hw, new_hw):
  coef_i, coef_j, offset = np.float32([1.5, -2.0]), np.float32([0.5, 3.0]), np.float32([1, 2])
  out = convert.resample_posemb_grid(_linear_field(*old_hw, coef_i, coef_j, offset), new_hw)
  step_i = (old_hw[0] - 1) / (new_hw[0] - 1)
  step_j = (old_hw[1] - 1) / (new_hw[1] - 1)
  np.testing.assert_allclose(out, _linear_field(*new_hw, coef_i * step_i, coef_j * step_j,
                                                offset), atol=1e-5)


def _flat(params):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("num_classes,init_head", [(7, "auto"), (5, "reset")])
def test_new_zero_head(tmp_path, source, num_classes, init_head):
  _, params = source
  arrays = _published(params, tmp_path)
  path = _save_npz(arrays, tmp_path / "5cls.npz")
  loaded, report = pretrained.load_params(_config(path, init_head=init_head),
                                          _init(_model(num_classes)))
  flat = _flat(loaded)
  assert flat["head/kernel"].shape == (32, num_classes)
  assert not flat["head/kernel"].any() and not flat["head/bias"].any()
  for key, value in flat.items():
    if not key.startswith("head/"):
      np.testing.assert_array_equal(value, arrays[key], err_msg=key)
  reason = report.reinitialised["head/kernel"]
  assert ("(32, 5)" in reason and "(32, 7)" in reason) if init_head == "auto" else \
      "reset" in reason
  assert set(report.unexpected) == {"head/kernel", "head/bias"}


def test_keeping_a_head_of_another_class_count_is_an_error(tmp_path, source):
  path = tmp_path / "5cls.npz"
  export.export_npz(source[1], str(path))
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"init_head='keep'.*\(32, 5\).*\(32, 7\)"):
    pretrained.load_params(_config(path, init_head="keep"), _init(_model(7)))


def test_width_mismatch_names_the_parameter_and_both_shapes(tmp_path, source):
  path = tmp_path / "w32.npz"
  export.export_npz(source[1], str(path))
  with pytest.raises(errors.CheckpointMismatchError) as error:
    pretrained.load_params(_config(path), _init(_model(width=48)))
  assert "embedding/kernel: file (4, 4, 3, 32) vs model (4, 4, 3, 48)" in str(error.value)
  assert f"{POSEMB}: file (1, 17, 32) vs model (1, 17, 48)" in str(error.value)


def test_missing_and_unexpected_parameters_are_reported(tmp_path, source):
  arrays = _published(source[1], tmp_path)
  del arrays["cls"]
  arrays[POSEMB] = arrays[POSEMB][:, 1:]  # A file without class token has no slot either.
  arrays["extra/w"] = np.ones(3, np.float32)
  arrays["pre_logits/kernel"] = np.ones((32, 32), np.float32)
  arrays["pre_logits/bias"] = np.ones(32, np.float32)
  path = _save_npz(arrays, tmp_path / "odd.npz")
  _, report = pretrained.load_params(_config(path), _init(_model()))
  assert report.missing == ["cls"]
  assert "no class token" in report.reinitialised["cls"] and SLOT in report.adapted
  assert report.unexpected["extra/w"] == "not in the model"
  assert "dropped" in report.unexpected["pre_logits/kernel"]
  text = report.format()
  assert "extra/w: not in the model" in text and "missing from the file" in text
  assert report.to_dict()["missing"] == ["cls"]

  del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
  path = _save_npz(arrays, tmp_path / "broken.npz")
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"missing from the file: Transformer/encoderblock_1/LayerNorm_2/"
                           r"scale \(32,\)[\s\S]*File keys not used: extra/w"):
    pretrained.load_params(_config(path), _init(_model()))


def test_pre_logits_keep_and_drop(tmp_path, source):
  arrays = _published(source[1], tmp_path)
  arrays["pre_logits/kernel"] = np.full((32, 24), 0.5, np.float32)
  arrays["pre_logits/bias"] = np.full(24, 0.25, np.float32)
  arrays["head/kernel"] = np.ones((24, 5), np.float32)
  path = _save_npz(arrays, tmp_path / "pre_logits.npz")
  with pytest.raises(errors.CheckpointMismatchError, match="representation_size=24"):
    pretrained.load_params(_config(path, init_pre_logits="keep"), _init(_model()))
  with_pre_logits = _init(_model(representation_size=24))
  kept, _ = pretrained.load_params(_config(path, init_pre_logits="keep"), with_pre_logits)
  np.testing.assert_array_equal(kept["pre_logits"]["kernel"], arrays["pre_logits/kernel"])
  np.testing.assert_array_equal(kept["head"]["kernel"], arrays["head/kernel"])
  dropped, report = pretrained.load_params(_config(path), with_pre_logits)
  np.testing.assert_array_equal(dropped["pre_logits"]["kernel"],
                                with_pre_logits["pre_logits"]["kernel"])
  assert "drop" in report.reinitialised["pre_logits/kernel"]
  # The file's head (the class count matches) was trained on the dropped layer: a new one.
  np.testing.assert_array_equal(dropped["head"]["kernel"], np.zeros((24, 5)))
  assert report.reinitialised["head/kernel"] == ("the file's head reads its pre_logits "
                                                 "layer, which is dropped: new zero head")
  with pytest.raises(errors.CheckpointMismatchError) as error:
    pretrained.load_params(_config(path, init_head="keep"), with_pre_logits)
  assert str(error.value) == (
      "config.init_head='keep' but the file's head reads its pre_logits layer, which "
      "config.init_pre_logits='drop' drops: set config.init_pre_logits='keep' (and "
      "config.model.overrides.representation_size=24), or init_head='reset'.")


def _save_run(workdir, step, params, best=False):
  tx = optax.adamw(1e-3)
  state = state_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                               opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32))
  store = checkpoints.CheckpointStore(str(workdir), keep=2)
  if best:
    store.save_best(step, state, {"position": step}, {"metric": "eval/top1", "value": 0.5})
  else:
    store.save(step, state, {"position": step}, {})
  store.close()


def test_loading_and_exporting_our_workdirs(tmp_path, source):
  model, latest = source
  best = jax.tree_util.tree_map(lambda x: x * 2.0, latest)
  workdir = tmp_path / "run"
  _save_run(workdir, 10, latest)
  target = _init(model)

  # Only a latest checkpoint: the workdir falls back to it.
  out = tmp_path / "latest.npz"
  assert export.export_workdir(str(workdir), str(out), "best").endswith("checkpoints/10")
  assert _published(latest, tmp_path).keys() == set(np.load(out).files)
  _save_run(workdir, 5, best, best=True)
  for path, expected in [(workdir, best), (workdir / "checkpoints" / "10", latest),
                         (workdir / "checkpoints", latest), (out, latest)]:
    loaded, report = pretrained.load_params(_config(path), target)
    assert len(report.loaded) == 40 and not report.unexpected, path
    for key, value in _flat(expected).items():
      np.testing.assert_array_equal(_flat(loaded)[key], value, err_msg=f"{path}: {key}")
  assert export.export_workdir(str(workdir), str(out)).endswith("best/5")
  with pytest.raises(errors.MissingCheckpointError, match="holds no checkpoint"):
    pretrained.load_params(_config(tmp_path), target)
  (tmp_path / "notes.txt").write_text("not an archive")
  with pytest.raises(errors.NotACheckpointError, match="not a NumPy .npz file"):
    pretrained.load_params(_config(tmp_path / "notes.txt"), target)


def test_finetune_config_arguments():
  config = finetune.get_config("dataset=cifar100,model=ViT-B/16,init=/ckpt/B_16.npz")
  config_lib.validate(config)
  assert (config.init_from, config.image_size, config.batch_size) == ("/ckpt/B_16.npz", 384, 512)
  assert (config.optim.name, config.optim.lr, config.optim.momentum) == ("sgd", 0.03, 0.9)
  assert (config.total_steps, config.optim.warmup_steps, config.optim.weight_decay) == \
      (10_000, 500, 0.0)
  assert (config.aug.normalize, config.aug.crop, config.aug.flip) == \
      ("minus_one_one", "inception", True)
  short = finetune.get_config("steps=500,optim=adamw,image_size=224")
  assert (short.total_steps, short.optim.warmup_steps, short.image_size) == (500, 50, 224)
  assert (short.optim.name, short.optim.lr, short.optim.weight_decay) == ("adamw", 1e-4, 0.05)
  with pytest.raises(ValueError, match="unknown key 'lr'; allowed keys: dataset, model, init"):
    finetune.get_config("dataset=cifar10,lr=0.1")
  with pytest.raises(ValueError, match="optim='lamb'"):
    finetune.get_config("optim=lamb")
  with pytest.raises(ValueError, match="steps='ten' must be a positive integer"):
    finetune.get_config("steps=ten")
  # A published checkpoint by name: the model (and variant) it holds, unless another is
  # asked for, which validation refuses before anything is downloaded.
  named = finetune.get_config("dataset=cifar100,init=big_vision:ViT-S/16-i1k-300ep")
  config_lib.validate(named)
  assert (named.model.name, named.model.overrides.posemb, named.model.overrides.pool,
          named.model.overrides.class_token) == ("ViT-S/16", "sincos2d", "gap", False)
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(finetune.get_config("model=ViT-S/16,init=augreg:ViT-B/16"))
  assert str(error.value) == (
      "config.init_from='augreg:ViT-B/16' holds a ViT-B/16: set --config.model.name=ViT-B/16 "
      "(or give its URL or path to load it into another model).")
  with pytest.raises(errors.ConfigError, match=r"^config.init_from='augreg:ViT-X/16' is not "
                                               r"a known checkpoint name: use one of vit:"):
    finetune.get_config("init=augreg:ViT-X/16")


def test_grey_checkpoint_into_an_rgb_model_is_the_grey_model_on_the_channel_mean(tmp_path):
  grey_model = _model()
  grey = _init(grey_model, seed=3)
  shapes = jax.eval_shape(lambda: state_lib.init_params(grey_model, 0, (16, 16, 1)))
  grey = jax.tree_util.tree_map(lambda s, p: p[..., :1, :] if s.shape != p.shape else p,
                                shapes, grey)
  path = tmp_path / "grey.npz"
  export.export_npz(grey, str(path))
  rgb_params, report = pretrained.load_params(_config(path, init_head="keep"),
                                              _init(_model()))
  assert report.adapted == {"embedding/kernel": "1 -> 3 input channels (repeated and divided "
                                                "by 3: the grey model on the mean)"}
  rgb_images = _images()
  np.testing.assert_allclose(
      grey_model.apply({"params": rgb_params}, rgb_images, train=False),
      grey_model.apply({"params": grey}, rgb_images.mean(-1, keepdims=True), train=False),
      rtol=1e-5, atol=1e-5)


def test_an_rgb_checkpoint_cannot_feed_another_channel_count(tmp_path, source):
  path = tmp_path / "rgb.npz"
  export.export_npz(source[1], str(path))
  shapes = jax.eval_shape(lambda: state_lib.init_params(_model(), 0, (16, 16, 4)))
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"shape mismatch: embedding/kernel: file \(4, 4, 3, 32\) vs model "
                           r"\(4, 4, 4, 32\)"):
    pretrained.load_params(_config(path), jax.tree_util.tree_map(jnp.zeros_like, shapes))


def test_a_published_checkpoint_cannot_feed_a_model_with_a_conv_stem(tmp_path, source):
  path = tmp_path / "rgb.npz"
  export.export_npz(source[1], str(path))
  shapes = jax.eval_shape(lambda: state_lib.init_params(_model(stem_features=8), 0,
                                                        (16, 16, 3)))
  with pytest.raises(errors.CheckpointMismatchError) as e:
    pretrained.load_params(_config(path), jax.tree_util.tree_map(jnp.zeros_like, shapes))
  assert str(e.value).endswith(
      "\n  shape mismatch: embedding/kernel: file (4, 4, 3, 32) vs model (128, 32)\n  "
      "missing from the file: stem/bias (8,)\n  missing from the file: stem/kernel "
      "(3, 3, 3, 8)")


def test_old_big_vision_table_with_a_slot_and_optional_modules(tmp_path, source):
  arrays = _layout(_published(source[1], tmp_path), "c")
  # big_vision before 2022 prepended cls first: a top-level table of 1 + 4 x 4 rows.
  arrays["params/pos_embedding"] = _published(source[1], tmp_path)[POSEMB]
  arrays["params/MAPHead_0/probe"] = np.ones((1, 1, 32), np.float32)
  path = _save_npz(arrays, tmp_path / "old.npz")
  target = _init(_model(num_registers=2))
  loaded, report = pretrained.load_params(_config(path), target)
  np.testing.assert_array_equal(loaded["Transformer"]["posembed_input"]["pos_embedding"],
                                arrays["params/pos_embedding"])
  assert "top-level pos_embedding with a class-token slot" in report.source
  assert not report.adapted
  np.testing.assert_array_equal(loaded["registers"], target["registers"])
  assert report.reinitialised == {"registers": "no register tokens in the file"}
  assert report.unexpected == {"MAPHead_0/probe": "the model does not pool with a MAP head "
                                                  "(config.model.overrides.pool='map')"}
  with_map = _init(_model(pool="map"))
  with pytest.raises(errors.CheckpointMismatchError,  # A MAP head in part is an error...
                     match=r"missing from the file: MAPHead_0/LayerNorm_0/scale \(32,\)"):
    pretrained.load_params(_config(path), with_map)
  export.export_npz(source[1], str(tmp_path / "token.npz"))
  loaded, report = pretrained.load_params(_config(tmp_path / "token.npz"), with_map)
  assert report.reinitialised["MAPHead_0/probe"] == "no MAP head in the file: a new one"
  assert "MAPHead_0/probe" in report.missing  # ... none at all, a new one.
  np.testing.assert_array_equal(loaded["MAPHead_0"]["probe"], with_map["MAPHead_0"]["probe"])


def test_fine_tuning_an_rgb_checkpoint_on_fashion_mnist_runs(fashion_mnist_dirs, tmp_path,
                                                             capsys):
  from vit_jax import train
  from vit_jax.configs import fashion_mnist
  rgb_model = _model(num_classes=1000, width=16, num_heads=2, mlp_dim=32)
  rgb = _init(rgb_model, size=28)
  path = tmp_path / "rgb.npz"
  export.export_npz(rgb, str(path))
  config = fashion_mnist.get_config()
  config.manual_dir, config.data_dir = fashion_mnist_dirs
  config.train_split, config.eval_split = "train[:256]", "test[:64]"
  config.model.overrides.update(dict(width=16, depth=2, num_heads=2, mlp_dim=32,
                                     patch_size=4,  # The checkpoint's patches.
                                     stem_features=0))  # The recipe's stem: not in the file.
  config.batch_size = config.eval_batch_size = 64
  config.total_steps, config.optim.warmup_steps = 3, 1
  config.init_from = str(path)
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "embedding/kernel: 3 -> 1 input channels (colour kernels summed" in out
  assert "head/kernel: head shape differs (file (16, 1000), model (16, 10))" in out
  assert final["eval/num_examples"] == 64 and 0.0 <= final["eval/top1"] <= 1.0
