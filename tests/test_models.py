"""The ViT model family: exact parameter counts, names, shapes, attention maps, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import cpu_kernels, layers

# Published counts (1000 classes, 224 px, class token, no pre_logits), from the ViT paper's
# checkpoints; the small-image and Keras rows are derived in the comments below.
EXPECTED_PARAMS = {
    "ViT-Ti/16": 5_717_416,
    "ViT-S/16": 22_050_664,
    "ViT-B/16": 86_567_656,
    "ViT-L/16": 304_326_632,
    "ViT-H/14": 632_045_800,
    "ViT-B/32": 88_224_232,
    "ViT-B/8": 86_576_872,
    "ViT-S/32": 22_878_952,
    "ViT-L/32": 306_535_400,
    # Ti/16 at 32 px with patch 4: the patch embedding shrinks by (16*16-4*4)*3*192 and
    # the position table from 197 to 65 tokens: 5,717,416 - 138,240 - 25,344.
    "ViT-Ti/4": 5_553_832,
    "ViT-S/4": 21_723_496,
    # Keras model.count_params() = 21,759,019, less Normalization's 7 statistics.
    "keras-example": 21_759_012,
    # timm 1.0.31: vit_so400m_patch14_siglip_224 with num_classes=1000 (MAP head, no class
    # token), counted from its architecture (pretrained=False).
    "ViT-So400m/14": 428_833_704,
}


def test_every_registered_model_has_an_expected_count():
  assert sorted(models.list_models()) == sorted(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name):
  num_classes = 100 if name == "keras-example" else 1000
  model = models.create_model(name, num_classes=num_classes)
  assert models.count_params(model, models.get_spec(name).image_size) == EXPECTED_PARAMS[name]


def _tiny(**overrides):
  kwargs = dict(depth=2, width=32, num_heads=2, mlp_dim=64)
  kwargs.update(overrides)
  return models.create_model("ViT-Ti/4", num_classes=7, **kwargs)


def _init(model, size=16, channels=3):
  x = jax.random.normal(jax.random.key(1), (4, size, size, channels))
  return model.init(jax.random.key(0), x, train=False), x


def test_parameter_names_match_published_checkpoints():
  shapes = jax.eval_shape(lambda: models.create_model("ViT-B/16", num_classes=1000).init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))["params"]
  flat = {"/".join(k.key for k in path): tuple(v.shape)
          for path, v in jax.tree_util.tree_leaves_with_path(shapes)}
  block = "Transformer/encoderblock_11"
  assert flat["embedding/kernel"] == (16, 16, 3, 768)
  assert flat["cls"] == (1, 1, 768)
  assert flat["Transformer/posembed_input/pos_embedding"] == (1, 197, 768)
  assert flat[f"{block}/MultiHeadDotProductAttention_1/query/kernel"] == (768, 12, 64)
  assert flat[f"{block}/MultiHeadDotProductAttention_1/query/bias"] == (12, 64)
  assert flat[f"{block}/MultiHeadDotProductAttention_1/out/kernel"] == (12, 64, 768)
  assert flat[f"{block}/MlpBlock_3/Dense_0/kernel"] == (768, 3072)
  assert flat[f"{block}/LayerNorm_2/scale"] == (768,)
  assert flat["Transformer/encoder_norm/bias"] == (768,)
  assert flat["head/kernel"] == (768, 1000)
  assert len(flat) == 200  # 16 per block x 12, plus 8: as in the published file.


def test_keras_example_attention_is_4x64_wide_in_a_64_wide_stream():
  model = models.create_model("keras-example", num_classes=100)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 72, 72, 3)),
                                             train=False))["params"]
  attn = shapes["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
  assert attn["query"]["kernel"].shape == (64, 4, 64)
  assert attn["out"]["kernel"].shape == (4, 64, 64)
  assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 144, 64)
  assert shapes["head_hidden_0"]["kernel"].shape == (144 * 64, 2048)
  assert "cls" not in shapes


def test_gelu_is_the_published_vits_tanh_form_and_the_keras_origins_erf():
  x = jnp.linspace(-4.0, 4.0, 101)
  tanh_form = 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  erf_form = 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))
  assert float(jnp.max(jnp.abs(tanh_form - erf_form))) > 1e-4  # The test tells them apart.
  for name, want in (("ViT-Ti/4", tanh_form), ("ViT-B/16", tanh_form),
                     ("keras-example", erf_form)):
    model = models.create_model(name, num_classes=10)
    np.testing.assert_allclose(cpu_kernels.gelu(x, model.gelu_approximate), want, atol=2e-6,
                               err_msg=name)
  for approximate in (True, False):  # bfloat16 stays bfloat16, forward and backward.
    y, vjp = jax.vjp(lambda v: cpu_kernels.gelu(v, approximate), x.astype(jnp.bfloat16))
    assert y.dtype == vjp(jnp.ones_like(y))[0].dtype == jnp.bfloat16


def test_pre_logits_layer():
  model = _tiny(representation_size=24)
  variables, x = _init(model)
  assert variables["params"]["pre_logits"]["kernel"].shape == (32, 24)
  _, extra = model.apply(variables, x, train=False, return_intermediates=True)
  assert extra["pre_logits"].shape == (4, 24)
  assert float(jnp.max(jnp.abs(extra["pre_logits"]))) <= 1.0  # tanh


@pytest.mark.parametrize("pool,tokens,features", [("token", 17, 32), ("gap", 17, 32),
                                                  ("flatten", 17, 17 * 32)])
def test_output_and_attention_shapes(pool, tokens, features):
  model = _tiny(pool=pool)
  variables, x = _init(model)
  logits, extra = model.apply(variables, x, train=False, return_intermediates=True)
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  assert extra["pre_logits"].shape == (4, features)
  weights = extra["attention_weights"]
  assert len(weights) == 2
  for w in weights:
    assert w.shape == (4, 2, tokens, tokens)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, rtol=1e-5)


def test_fused_and_explicit_attention_agree():
  model = _tiny(zero_head_init=False)
  variables, x = _init(model)
  fused = model.apply(variables, x, train=False)
  explicit, _ = model.apply(variables, x, train=False, return_intermediates=True)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(explicit), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fields", [
    {}, {"class_token": False, "pool": "gap", "representation_size": 8},
    {"head_hidden_dims": (16,), "mlp_activate_output": True, "gelu_approximate": False,
     "head_dim": 12, "class_token": False, "pool": "flatten"},
    {"class_token": False, "pool": "map", "representation_size": 8},
    {"posemb": "sincos2d", "num_registers": 2, "pool": "gap"}])
def test_cpu_and_xla_kernels_give_the_same_logits_and_gradients(fields):
  # One parameter tree, two implementations of the layers (models/layers.py).
  cpu = _tiny(zero_head_init=False, kernels="cpu", **fields)
  xla = _tiny(zero_head_init=False, kernels="xla", **fields)
  variables, x = _init(cpu)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      xla.init(jax.random.key(0), x, train=False))
  labels = jax.nn.one_hot(jnp.arange(x.shape[0]) % 7, 7)

  def loss(model, params):
    logits = model.apply({"params": params}, x, train=False)
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1)), logits

  (loss_cpu, logits_cpu), grads_cpu = jax.value_and_grad(
      lambda p: loss(cpu, p), has_aux=True)(variables["params"])
  (loss_xla, logits_xla), grads_xla = jax.value_and_grad(
      lambda p: loss(xla, p), has_aux=True)(variables["params"])
  assert float(jnp.abs(logits_cpu).max()) > 0.1  # A real signal, not zeros.
  np.testing.assert_allclose(np.asarray(logits_cpu), np.asarray(logits_xla), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(float(loss_cpu), float(loss_xla), rtol=1e-6)
  flat_xla = dict(jax.tree_util.tree_leaves_with_path(grads_xla))
  # Relative to the largest gradient: some are zero up to rounding (the key bias, which
  # shifts a whole softmax row), and their rounding noise differs between the paths.
  scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_cpu))
  for path, g_cpu in jax.tree_util.tree_leaves_with_path(grads_cpu):
    np.testing.assert_allclose(np.asarray(g_cpu), np.asarray(flat_xla[path]), rtol=1e-4,
                               atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


def test_kernels_resolve_per_backend_dtype_and_head_size():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert models.resolve_kernels("auto", "cpu", bf16, 64) == "cpu"
  assert models.resolve_kernels("auto", "gpu", bf16, 64) == "cudnn"
  assert models.resolve_kernels("auto", "gpu", f32, 64) == "xla"  # cuDNN: 16-bit only.
  assert models.resolve_kernels("auto", "gpu", bf16, 12) == "xla"  # Not a multiple of 8.
  assert models.resolve_kernels("auto", "tpu", bf16, 64) == "xla"
  assert models.resolve_kernels("xla", "cpu", f32, 64) == "xla"
  assert models.resolve_kernels("cpu", "gpu", f32, 64) == "cpu"
  with pytest.raises(ValueError, match=r"^kernels='gpu': use one of \('auto', 'cpu', 'xla', "
                                       r"'cudnn'\)\.$"):
    models.resolve_kernels("gpu", "cpu", f32, 64)
  with pytest.raises(ValueError, match=r"^kernels='cudnn' cannot run here: it needs a GPU\. "):
    models.resolve_kernels("cudnn", "cpu", bf16, 64)
  with pytest.raises(ValueError, match=r"^kernels='cudnn' cannot run here: it needs bfloat16 "
                                       r"or float16 compute \(got float32\)"):
    models.resolve_kernels("cudnn", "gpu", f32, 64)


@pytest.mark.parametrize("length", [65, 64])
def test_padding_to_an_even_length_leaves_attention_unchanged(length):
  # What cuDNN gets for 65 tokens (a class token and 8 x 8 patches): 66, the last masked.
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, length, 4, 16))

  def attend(q, k, v, pad):
    return layers.dot_product_attention(q, k, v, None, pad_odd_length=pad)

  out, grads = jax.value_and_grad(lambda *a: jnp.sum(attend(*a, True) ** 2), (0, 1, 2))(q, k, v)
  ref, ref_grads = jax.value_and_grad(lambda *a: jnp.sum(attend(*a, False) ** 2),
                                      (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(float(out), float(ref), rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
  padded = jax.make_jaxpr(lambda *a: attend(*a, True))(q, k, v)
  assert ("pad" in str(padded)) == (length % 2 == 1)


def test_bfloat16_keeps_softmax_logits_and_statistics_in_float32():
  # Every matmul of the bfloat16 model takes bfloat16 inputs; those that make the attention
  # logits (B x H x L x L) and the class logits (B x K) accumulate in float32.
  for kernels in ("xla", "cpu"):
    model = _tiny(dtype=jnp.bfloat16, kernels=kernels, zero_head_init=False)
    variables, x = _init(model)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x, train=True))(variables)
    dots = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
    assert len(dots) >= 13, kernels  # 6 or 8 per block (q/k/v fused or not), the head.
    for eqn in dots:
      assert {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)}, (kernels, eqn)
    float32_outputs = {tuple(eqn.outvars[0].aval.shape) for eqn in dots
                       if eqn.outvars[0].aval.dtype == jnp.float32}
    # The attention logits: 4 x 2 x 17 x 17 (XLA's attention adds a group axis of 1).
    assert any(shape.count(17) == 2 and np.prod(shape) == 4 * 2 * 17 * 17
               for shape in float32_outputs), (kernels, float32_outputs)
    assert (4, 7) in float32_outputs, (kernels, float32_outputs)
    assert len(float32_outputs) < len({tuple(e.outvars[0].aval.shape) for e in dots}), kernels


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _all_eqns(inner)


def test_variant_parameters_have_big_visions_names_and_shapes():
  shapes = lambda model: jax.eval_shape(lambda: _init(model)[0])["params"]  # noqa: E731
  default = shapes(_tiny())
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v.shape
          for p, v in jax.tree_util.tree_leaves_with_path(
              shapes(_tiny(pool="map", class_token=False, num_registers=3,
                           posemb="sincos2d")))}
  assert flat["registers"] == (1, 3, 32)
  assert flat["MAPHead_0/probe"] == (1, 1, 32)
  assert flat["MAPHead_0/MultiHeadDotProductAttention_0/query/kernel"] == (32, 2, 16)
  assert flat["MAPHead_0/MultiHeadDotProductAttention_0/out/kernel"] == (2, 16, 32)
  assert flat["MAPHead_0/LayerNorm_0/scale"] == (32,)
  assert flat["MAPHead_0/MlpBlock_0/Dense_0/kernel"] == (32, 64)
  assert "cls" not in flat and not any("posembed_input" in k for k in flat)
  assert len([k for k in flat if k.startswith("MAPHead_0/")]) == 15  # 1 + 8 + 2 + 4.
  assert default["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 32)
  assert "registers" not in default and "MAPHead_0" not in default


def test_sincos2d_table_is_big_visions():
  table_1xNxD = models.vit.posemb_sincos2d(3, 5, 8)
  assert table_1xNxD.shape == (1, 15, 8) and table_1xNxD.dtype == np.float32
  omega = np.array([1.0, 1e-4])  # 10000^-(k / (8/4 - 1)), k = 0, 1.
  row, col = 2, 3  # Token 2 * 5 + 3: channels sin(x w), cos(x w), sin(y w), cos(y w).
  np.testing.assert_allclose(table_1xNxD[0, row * 5 + col], np.concatenate(
      [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]),
      rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4 and >= 8, not 6"):
    models.vit.posemb_sincos2d(2, 2, 6)


def test_registers_and_the_class_token_come_before_the_patches():
  # Pooling reads the class token (token) or the patches only (gap); registers are tokens
  # 1..R, with no position embedding: the model's output depends on their values.
  model = _tiny(num_registers=2, pool="gap", zero_head_init=False)
  variables, x = _init(model)
  logits, extra = model.apply(variables, x, train=False, return_intermediates=True)
  assert extra["attention_weights"][0].shape == (4, 2, 19, 19)
  params = dict(variables["params"], registers=variables["params"]["registers"] * 2)
  assert not np.allclose(model.apply({"params": params}, x, train=False), logits)


def test_scan_layers_matches_unrolled_blocks():
  unrolled, scanned = _tiny(zero_head_init=False), _tiny(zero_head_init=False,
                                                         scan_layers=True)
  variables, x = _init(unrolled)
  params = dict(variables["params"])
  params["Transformer"] = dict(params["Transformer"])  # Copies: the original is used below.
  blocks = [params["Transformer"].pop(f"encoderblock_{i}") for i in range(2)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)
  params["Transformer"] = {**params["Transformer"], "encoderblock": stacked}
  np.testing.assert_allclose(np.asarray(scanned.apply({"params": params}, x, train=False)),
                             np.asarray(unrolled.apply(variables, x, train=False)),
                             rtol=1e-5, atol=1e-6)


def test_same_seed_same_params_and_different_seed_differs():
  model = _tiny()
  x = jnp.zeros((1, 16, 16, 3))
  a = model.init(jax.random.key(3), x, train=False)
  b = model.init(jax.random.key(3), x, train=False)
  c = model.init(jax.random.key(4), x, train=False)
  leaves = lambda v: jax.tree_util.tree_leaves(v)  # noqa: E731
  assert all(np.array_equal(p, q) for p, q in zip(leaves(a), leaves(b)))
  assert not np.array_equal(a["params"]["embedding"]["kernel"], c["params"]["embedding"]["kernel"])


def test_dropout_acts_only_in_training():
  model = _tiny(dropout_rate=0.5, attention_dropout_rate=0.5, stochastic_depth_rate=0.5,
                head_dropout_rate=0.5, zero_head_init=False)
  variables, x = _init(model)
  eval1 = model.apply(variables, x, train=False)
  eval2 = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(eval1), np.asarray(eval2))
  train1 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  train2 = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(train1, eval1)
  assert not np.allclose(train1, train2)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16, zero_head_init=False)
  variables, x = _init(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  logits = model.apply(variables, x, train=False)
  reference = _tiny(zero_head_init=False).apply(variables, x, train=False)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=0.1)


def test_grayscale_input():
  variables, x = _init(_tiny(), channels=1)
  assert variables["params"]["embedding"]["kernel"].shape == (4, 4, 1, 32)


def test_conv_stem_equals_a_3x3_convolution_then_a_strided_patch_convolution():
  model = _tiny(stem_features=5)
  variables, x = _init(model, channels=2)  # 16 px: a 4 x 4 grid of 4-pixel patches.
  params = variables["params"]
  assert params["stem"]["kernel"].shape == (3, 3, 2, 5)
  assert params["embedding"]["kernel"].shape == (4 * 4 * 5, 32)
  _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
  (tokens_BxNxD,) = state["intermediates"]["embedding"]["__call__"]
  # Independently, with XLA's convolutions: SAME 3x3, tanh GELU, then a 4 x 4 stride-4
  # convolution whose kernel is the embedding's, read as 4 x 4 x F x D.
  dn = ("NHWC", "HWIO", "NHWC")
  y = jax.lax.conv_general_dilated(x, params["stem"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=dn, precision="highest")
  y = jax.nn.gelu(y + params["stem"]["bias"], approximate=True)
  expected = jax.lax.conv_general_dilated(
      y, params["embedding"]["kernel"].reshape(4, 4, 5, 32), (4, 4), "VALID",
      dimension_numbers=dn, precision="highest") + params["embedding"]["bias"]
  np.testing.assert_allclose(tokens_BxNxD, expected.reshape(4, 16, 32), rtol=2e-5, atol=2e-5)
  assert models.count_params(model, 16, channels=2) == (
      models.count_params(_tiny(), 16, channels=2) - 4 * 4 * 2 * 32 + 3 * 3 * 2 * 5 + 5
      + 4 * 4 * 5 * 32)


def test_bad_inputs_raise_clear_errors():
  model = _tiny()
  with pytest.raises(ValueError, match=r"Image size 18x18 is not divisible by the patch "
                                       r"size 4: set config.image_size to a multiple of 4"):
    model.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)), train=False)
  with pytest.raises(ValueError, match=r"Unknown model 'ViT-X/3'. Registered models: ViT-Ti/16"):
    models.create_model("ViT-X/3", num_classes=10)
  with pytest.raises(ValueError, match=r"Unknown model option\(s\) \['widht'\]"):
    models.create_model("ViT-Ti/4", num_classes=10, widht=3)


# --- Hand-written backward passes (models.py: matmul, attention, LayerNorm) -------------


def _reference_attention(q, k, v, key, rate):
  """softmax(q k^T) [dropout] v, differentiated by autodiff."""
  p = jax.nn.softmax(jnp.einsum("bhlk,bhtk->bhlt", q, k), axis=-1)
  if key is not None:
    p = jnp.where(cpu_kernels.dropout_keep_mask(key, p.shape, rate), p / (1 - rate), 0.0)
  return jnp.einsum("bhlt,bhtk->bhlk", p, v)


def _reference_layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _assert_same_gradients(f, reference, args):
  """Same values and same vector-Jacobian products (for a random cotangent) as autodiff."""
  y, vjp = jax.vjp(f, *args)
  y_ref, vjp_ref = jax.vjp(reference, *args)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
  cotangent = jax.random.normal(jax.random.key(9), y.shape)
  for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_attention_backward_pass_equals_autodiff(rate):
  qkv_BxLx3xHxK = jax.random.normal(jax.random.key(0), (2, 7, 3, 4, 8))
  key = jax.random.key(5) if rate else None

  def reference(qkv_BxLx3xHxK):
    q, k, v = jnp.transpose(qkv_BxLx3xHxK, (2, 0, 3, 1, 4))
    return jnp.transpose(_reference_attention(q, k, v, key, rate), (0, 2, 1, 3))

  _assert_same_gradients(lambda qkv: cpu_kernels.fused_attention(qkv, key, rate), reference,
                         (qkv_BxLx3xHxK,))


def test_dense_gelu_and_layer_norm_backward_passes_equal_autodiff():
  x = jax.random.normal(jax.random.key(1), (2, 5, 6))
  w = jax.random.normal(jax.random.key(2), (6, 3, 4))
  dims = (((2,), (0,)), ((), ()))
  _assert_same_gradients(lambda x, w: cpu_kernels.dense_dot_general(x, w, dims),
                         lambda x, w: jax.lax.dot_general(x, w, dims), (x, w))
  x2d, w2d, b = x.reshape(10, 6), w.reshape(6, 12), jax.random.normal(jax.random.key(4), (12,))
  _assert_same_gradients(cpu_kernels.affine, lambda x, w, b: x @ w + b, (x2d, w2d, b))
  for approximate in (True, False):
    _assert_same_gradients(lambda x: cpu_kernels.gelu(x, approximate),
                           lambda x: jax.nn.gelu(x, approximate=approximate), (3 * x,))
  scale, bias = jax.random.normal(jax.random.key(3), (2, 6))
  _assert_same_gradients(lambda *a: cpu_kernels._layer_norm(*a, 1e-6),
                         lambda *a: _reference_layer_norm(*a, 1e-6), (3 * x + 1, scale, bias))


def test_dropout_mask_keeps_the_right_fraction_and_depends_only_on_key_and_shape():
  shape = (64, 128, 128)  # 1M elements: the kept fraction is within 0.1% of 1 - rate.
  a = cpu_kernels.dropout_keep_mask(jax.random.key(0), shape, 0.3)
  assert a.shape == shape and a.dtype == jnp.bool_
  assert abs(float(a.mean()) - 0.7) < 1e-3
  np.testing.assert_array_equal(a, cpu_kernels.dropout_keep_mask(jax.random.key(0), shape, 0.3))
  b = cpu_kernels.dropout_keep_mask(jax.random.key(1), shape, 0.3)
  assert abs(float((a == b).mean()) - (0.7**2 + 0.3**2)) < 2e-3  # Independent of a.
  assert float(cpu_kernels.dropout_keep_mask(jax.random.key(0), shape, 0.0).mean()) == 1.0
