r"""Fine-tuning a pretrained ViT: the published vision_transformer recipe (default SGD).

Arguments, comma-separated `key=value` pairs after the colon:
  dataset=cifar100      a TFDS name (or "folder" with --config.data_dir)
  model=ViT-B/16        a registered model (vit_jax.models.list_models()); with a published
                        checkpoint name as init, the model that name holds by default
  init=NAME|URL|PATH    same as --config.init_from: a published checkpoint by name (below;
                        downloaded once into ~/.cache/vit_jax/checkpoints), an https://
                        URL of a published .npz, a .npz in a published layout, or a
                        workdir / checkpoint folder of ours (local, or on gs://)
  steps=10000           total steps (steps=500 is the published short run)
  optim=sgd             "sgd" (the published recipe) or "adamw" (our alternative)
  image_size=384        fine-tuning resolution; the position embeddings are resampled

  python main.py --workdir=workdirs/ft_cifar100_b16 \
      --config=configs/finetune.py:dataset=cifar100,model=ViT-B/16,init=vit:ViT-B/16-i21k
  python main.py --workdir=workdirs/ft_cifar100_b16_500 \
      --config=configs/finetune.py:dataset=cifar100,init=vit:ViT-B/16-i21k,steps=500
  python main.py --workdir=workdirs/ft_cifar10_augreg \
      --config=configs/finetune.py:dataset=cifar10,model=ViT-B/16,init=augreg:ViT-B/16

Names (vit_jax.models.hub.CHECKPOINTS): "vit:ViT-{B/16,B/32,L/16,L/32,H/14}-i21k" (the ViT
paper's ImageNet-21k files, gs://vit_models/imagenet21k/), "vit:ViT-...-i21k-i1k" (the same
fine-tuned on ImageNet-1k), "augreg:ViT-{Ti/16,S/16,S/32,B/16,B/32,B/8,L/16}" (the
recommended AugReg ImageNet-21k files), "big_vision:ViT-S/16-i1k-{90,150,300}ep" (sincos2d,
average pooling, no class token: set automatically) and "siglip:ViT-{B/16-224,L/16-256,
So400m/14-224,So400m/14-384}" (SigLIP image towers: MAP head, no class token).

What it reproduces: the vision_transformer README's fine-tuning results, ViT-B/16
pretrained on ImageNet-21k (the ViT paper's file: init=vit:ViT-B/16-i21k), 384 px, batch
512, published top-1 on the test split and the wall-clock time of the published run:

  | dataset   | steps / warmup | published top-1 | published run         |
  |-----------|----------------|-----------------|-----------------------|
  | CIFAR-10  | 10,000 / 500   | 99.02%          | 2.2 h on A100 GPUs    |
  | CIFAR-100 | 10,000 / 500   | 92.06%          | 2.2 h on A100 GPUs    |
  | CIFAR-10  | 1,000 / 100    | 98.86%          | 39 min                |
  | CIFAR-100 | 1,000 / 100    | 91.15%          | 39 min                |
  | CIFAR-10  | 500 / 50       | 98.59%          | 17 min                |
  | CIFAR-100 | 500 / 50       | 89.17%          | 17 min                |

(dropout 0.0, the recipe's default; with dropout 0.1 the README lists 98.76% and 91.92%
at 10k steps.) The AugReg files (init=augreg:...) are a different, better pretraining;
these figures are not theirs. NOT reproduced here: no network and no accelerator where
this was written; the loader is checked against timm's on small files of every layout
(tests/test_references.py), not on the published files themselves.

The published recipe (vision_transformer README and configs): SGD momentum 0.9, no weight
decay, lr 0.03, batch 512, 384 px, 500 warmup steps then cosine to 0, global-norm
clipping at 1.0, 10k steps, no dropout, no label smoothing, pixels scaled to [-1, 1],
inception crop (area 5%-100%) and horizontal flip for training, resize for evaluation,
98% of the training split for training; new zero head, pre_logits dropped. Short runs
warm up for a tenth of their steps (50 at steps=500, as published): a 500-step warmup
would leave no steps at the peak learning rate. Evaluation resizes the whole image, as
the published runs did (`config.aug.eval_crop_fraction=1.0`).

`optim=adamw`: AdamW lr 1e-4, weight decay 0.05 multiplied by the lr ("decoupled_lr",
kernels only), otherwise the same schedule: a usual order of magnitude for fine-tuning
ViTs with Adam, not tuned here and not a published ViT result.

Greyscale data (fashion_mnist, medical images) with an RGB checkpoint: the patch
embedding's colour kernels are summed (as timm does), exactly what the RGB model computes
for a grey image given as 3 equal channels; the load report says so.

Time: B/16 at 384 px (577 tokens) costs 55 GMAC = 110 GFLOP per image forward, about
330 GFLOP per trained image, so 1.7e17 FLOP per 1000 steps of 512. On one H100 in
bfloat16 (--config.compute_dtype=bfloat16) at 40-50% of peak: about 1-1.2 h for 10k
steps, 3-4 min for 500 (estimated from FLOPs, not measured); out of reach of a 2-core
CPU. Memory: if a batch of 512 does not fit, set --config.optim.accum_steps=8 (the
published runs accumulated 8 micro-batches).
"""
import ml_collections

from vit_jax.config import get_base_config, published_model

_ALLOWED = ("dataset", "model", "init", "steps", "optim", "image_size")
_OPTIMS = ("sgd", "adamw")
_PUBLISHED_STEPS = 10_000
_PUBLISHED_WARMUP = 500


def parse_args(arg: str) -> dict[str, str]:
  """'k=v,k=v' -> {k: v}; unknown or repeated keys and missing '=' are errors."""
  args: dict[str, str] = {}
  for item in filter(None, (part.strip() for part in arg.split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not value.strip():
      raise ValueError(f"configs/finetune.py: {item!r} is not key=value; allowed keys: "
                       f"{', '.join(_ALLOWED)}.")
    if key not in _ALLOWED:
      raise ValueError(f"configs/finetune.py: unknown key {key!r}; allowed keys: "
                       f"{', '.join(_ALLOWED)}.")
    if key in args:
      raise ValueError(f"configs/finetune.py: {key!r} is given twice.")
    args[key] = value.strip()
  return args


def _positive_int(key: str, value: str) -> int:
  if not value.isdigit() or int(value) <= 0:
    raise ValueError(f"configs/finetune.py: {key}={value!r} must be a positive integer.")
  return int(value)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_args(arg)
  steps = _positive_int("steps", args.get("steps", str(_PUBLISHED_STEPS)))
  optim = args.get("optim", "sgd")
  if optim not in _OPTIMS:
    raise ValueError(f"configs/finetune.py: optim={optim!r}; use one of {', '.join(_OPTIMS)}.")

  config = get_base_config()
  config.dataset = args.get("dataset", "cifar100")
  config.train_split = "train[:98%]"
  config.eval_split = "test"
  config.model.name = args.get("model", "ViT-B/16")
  config.image_size = _positive_int("image_size", args.get("image_size", "384"))
  if "init" in args:
    config.init_from = args["init"]
    published = published_model(args["init"])
    if published and args.get("model", published[0]) == published[0]:
      # The model whose function the named checkpoint holds (validate() names any clash).
      config.model.name = published[0]
      config.model.overrides.update(published[1])
  config.init_head = "auto"
  config.init_pre_logits = "drop"

  config.aug.normalize = "minus_one_one"
  config.aug.crop = "inception"
  config.aug.crop_scale = (0.05, 1.0)
  config.aug.flip = True
  config.label_smoothing = 0.0

  config.batch_size = 512
  config.eval_batch_size = 512
  config.total_steps = steps
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = min(_PUBLISHED_WARMUP, max(1, steps // 10))
  config.optim.grad_clip_norm = 1.0
  if optim == "sgd":
    config.optim.name = "sgd"
    config.optim.lr = 0.03
    config.optim.momentum = 0.9
    config.optim.weight_decay = 0.0
  else:
    config.optim.name = "adamw"
    config.optim.lr = 1e-4
    config.optim.weight_decay = 0.05
    config.optim.weight_decay_mode = "decoupled_lr"

  config.log_every_steps = min(50, steps)
  config.eval_every_steps = max(1, steps // 10)
  config.checkpoint_every_steps = max(1, steps // 10)
  return config
