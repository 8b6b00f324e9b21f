r"""ImageNet-1k from scratch, big_vision style: ViT-S/16 (default) or ViT-B/16 (`:B/16`).

Global-average pooling without a class token, inception crop + flip at 224 px,
RandAugment(2, 10), mixup 0.2, AdamW lr 1e-3 (batch 1024), 10k warmup steps then cosine,
gradient clipping 1.0, 90 epochs. big_vision's decay of 1e-4 per step x schedule is
`decoupled_lr` with weight_decay 0.1 at lr 1e-3. ImageNet must be downloaded by hand (TFDS
`imagenet2012` manual_dir: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar).

Input: big_vision's ImageNet recipe on the host, in grain worker processes: training
decodes each JPEG and takes the inception crop at full resolution
(`decode_jpeg_and_inception_crop(224)|flip_lr`: bilinear resize of the box, no
antialiasing), evaluation resizes the shorter side to 256 with area resampling and takes the
central 224 (`resize_small(256)|central_crop(224)`, crop fraction 0.875).
RandAugment, mixup and normalisation run on the device.

  python main.py --config=configs/imagenet.py --workdir=workdirs/imagenet_s16 \
      --config.manual_dir=/path/to/imagenet/tars --config.compute_dtype=bfloat16

  Expected: ViT-S/16 about 76.5% top-1 after 90 epochs (big_vision's plain ViT-S/16
  figure; 80% after 300 epochs). Time: 111,477 steps of 1024 at 13.8 GFLOP/image training,
  about 1.5 days on 8 A100s or a v3-8 TPU. ViT-B/16: about 4x the compute. Not run here.
"""
import ml_collections

from vit_jax.config import get_base_config


def get_config(arg: str = "S/16") -> ml_collections.ConfigDict:
  if arg not in ("S/16", "B/16"):
    raise ValueError(f"configs/imagenet.py takes 'S/16' or 'B/16', not {arg!r}.")
  config = get_base_config()
  config.dataset = "imagenet2012"
  config.train_split = "train[:99%]"
  config.val_split = "train[99%:]"  # big_vision's minival: the best checkpoint is picked on it.
  config.eval_split = "validation"
  config.image_size = 224
  config.input.worker_count = 8  # Decoding and cropping ~3,000 photos/s per GPU.
  config.model.name = f"ViT-{arg}"
  config.model.overrides.class_token = False
  config.model.overrides.pool = "gap"
  config.aug.normalize = "minus_one_one"
  config.aug.crop = "inception"
  config.aug.eval_crop_fraction = 0.875
  config.aug.flip = True
  config.aug.randaugment_layers = 2
  config.aug.randaugment_magnitude = 10
  config.aug.mixup_alpha = 0.2
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.num_epochs = 90.0
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.1
  config.optim.warmup_steps = 10_000
  config.optim.grad_clip_norm = 1.0
  config.compute_dtype = "bfloat16"
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000
  return config
