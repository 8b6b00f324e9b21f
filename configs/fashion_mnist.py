r"""Fashion-MNIST from scratch: a small ViT that trains in minutes on a 2-core CPU.

The real dataset we can measure on offline: TFDS builds it from the official files.

  python main.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist \
      --config.manual_dir=../shared/data/fashion_mnist

  Expected: 90.5% top-1, 99.9% top-5 on the 10,000 test images, each scored with its
  mirror image (logits averaged: `aug.eval_flip`). Measured 2026-11-30, seed 0: 90.50% /
  99.90% (89.83% / 99.88% on the images alone); seed 1: 90.33% (89.79%). Time: 2,578 steps
  of 256; 14 min 18 s on an idle 2-core AMD EPYC (about 880-930 img/s), the dataset build
  (27 s) and six evaluations included.

A 4-block, 128-wide ViT on 4x4 patches of 7x7 pixels plus a class token, after a 3x3
convolution of 8 channels + GELU at full resolution (`stem_features=8`; 0.58M params),
horizontal flips, AdamW lr 2e-3 with warmup and cosine decay, 11 epochs of batch 256.
7x7-pixel patches (16 tokens) learn as much per epoch here as 4x4 ones (49 tokens) at 2.8x
the images/s. The stem gives the patches local features for about 15% of the images/s:
+0.5 point (89.33% and 88.93% without it, 10 epochs; 14 epochs without it gave no more). In
this budget the model underfits, so the random crop and label smoothing are left out
(87.55% with both, 89.33% without, no stem). Averaging each test image's logits with its
mirror image's adds 0.5-0.7 point (the model trains on flips, so both views are its
input) for a few seconds per evaluation. What was tried and what it changed:
docs/fashion_mnist.md. Trained longer or otherwise regularised, the single view stays at
89.5-89.9%.

`:best`, the long recipe, for an accelerator: configs/cifar100.py's ViT-Ti/4 (192 wide, 12
blocks, 3 heads; 4x4-pixel patches: 49 tokens and a class token) after a 3x3 stem of 16
channels (5.4M params), a 2-pixel pad-crop and flips, label smoothing 0.1, AdamW lr 1e-3
(weight decay 0.05), 5 warmup epochs then cosine, 75 epochs of batch 256.

  python main.py --config=configs/fashion_mnist.py:best --workdir=workdirs/fmnist_best \
      --config.manual_dir=../shared/data/fashion_mnist --config.compute_dtype=bfloat16

  Measured (2026-11-30, one H200, jax 0.11.2, bfloat16, seeds 0 and 1 side by side on the
  one GPU): 92.51% / 99.80% (seed 0), 92.84% / 99.66% (seed 1); 4 min 41 s for the two
  runs together, compiles and six evaluations each included. 93% is not reached yet: top-1
  still rose over the last 15 epochs (92.07% / 92.61% at 60). With the CIFAR-100 recipe's
  random erasing 0.25 and stochastic depth 0.1 as well: 92.19% / 92.20%. On the 2-core
  CPU: days (bench mode: 17.6 img/s with two training runs beside it, for 4.5M images).
  Scored on single views: `aug.eval_flip` (as in the default recipe above) is not measured
  on it yet.

`:keras`, the Keras origin at the budget of the Keras example's own run on this data
(../shared/peers/README.md): `configs/cifar100.py:keras` (the example's model, augmentation
and AdamW, faithfully) on the first 10,240 training images, of which the last 1,024
validate (Keras's validation_split=0.1), 3 epochs of 36 steps of 256, one evaluation per
epoch, the best-validation checkpoint scored on the 10,000 test images. Weight decay as
Keras 3's AdamW (the peer run's Keras): 1e-4 x lr on every weight.

  python main.py --config=configs/fashion_mnist.py:keras --workdir=workdirs/fmnist_keras \
      --config.manual_dir=../shared/data/fashion_mnist

  Expected: 75.6% top-1, 99.4% top-5 (measured 2026-11-30, seed 0: 75.63% / 99.35%,
  best validation at the last epoch); the Keras example on the same images and budget:
  72.03% / 99.06% (its best-validation epoch). Time: 108 steps; 21 min on the 2-core CPU
  with other jobs running (27 img/s; about 70 img/s alone), the Keras example 50 min.
"""
import ml_collections

from vit_jax.config import get_base_config
from vit_jax.configs import cifar100


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg == "keras":
    return _keras_budget()
  if arg == "best":
    return _best()
  if arg:
    raise ValueError(f"Unknown argument {arg!r} for configs/fashion_mnist.py: use '', "
                     "'best' or 'keras'.")
  config = get_base_config()
  config.dataset = "fashion_mnist"
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 28
  config.model.name = "ViT-Ti/4"
  config.model.overrides.width = 128
  config.model.overrides.depth = 4
  config.model.overrides.num_heads = 4
  config.model.overrides.mlp_dim = 256
  config.model.overrides.patch_size = 7  # 16 tokens: 2.8x the images/s of 4x4 patches.
  config.model.overrides.stem_features = 8  # +0.5 point for about 15% of the images/s.
  config.aug.normalize = "dataset"
  config.aug.flip = True
  # Scored on each test image and its mirror (logits averaged): +0.5-0.7 point at twice
  # the cost of the evaluations, a few seconds each.
  config.aug.eval_flip = True
  # No random crop, no label smoothing: in 10 epochs the model underfits, and both slowed
  # its learning (87.55% with both, 88.70% without the crop, 89.33% without either).
  config.aug.crop = "none"
  config.label_smoothing = 0.0
  config.optim.lr = 2e-3
  config.optim.weight_decay = 0.05
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 200
  config.optim.grad_clip_norm = 1.0
  config.batch_size = 256
  config.num_epochs = 11.0
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config


def _keras_budget() -> ml_collections.ConfigDict:
  config = cifar100.get_config("keras")
  config.dataset = "fashion_mnist"
  config.train_split = "train[:9216]"
  config.val_split = "train[9216:10240]"
  config.eval_split = "test"
  config.num_epochs = 3.0
  config.optim.weight_decay_mode = "decoupled_lr"
  config.log_every_steps = 12
  config.eval_every_steps = 36  # Once per epoch, as Keras's ModelCheckpoint.
  config.checkpoint_every_steps = 36
  return config


def _best() -> ml_collections.ConfigDict:
  """configs/cifar100.py's ViT-Ti/4 with a 16-channel stem and light augmentation."""
  config = cifar100.get_config()
  config.dataset = "fashion_mnist"
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 28
  config.model.overrides.stem_features = 16
  # With random erasing 0.25 and stochastic depth 0.1 as well, the training loss stayed
  # far above the test loss (0.65 against 0.29) and top-1 was 0.3-0.6 point lower.
  config.model.overrides.stochastic_depth_rate = 0.0
  config.aug.crop_padding = 2
  config.aug.randaugment_layers = 0
  config.aug.mixup_alpha = 0.0
  config.aug.cutmix_alpha = 0.0
  config.aug.random_erasing = 0.0
  config.optim.warmup_epochs = 5.0
  config.num_epochs = 75.0
  config.log_every_steps = 100
  config.eval_every_steps = 3515  # Every 15 epochs.
  config.checkpoint_every_steps = 3515
  return config
