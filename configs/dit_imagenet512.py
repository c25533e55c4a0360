"""DiT-XL/2 on ImageNet 512x512 (SD-VAE latents 64x64x4).

The 256 recipe (configs/dit_imagenet256.py) at 512px: same optimizer, EMA and
diffusion; 1024 tokens per image for /2 models.

  python -m jdit.data.extract_latents --source folder \\
      --folder /data/imagenet/train --image_size 512 \\
      --vae /ckpt/sd-vae-ft-ema --out /data/latents/imagenet512
  python train.py --config configs/dit_imagenet512.py \\
      --config.data.data_dir=/data/latents/imagenet512 \\
      --config.vae.path=/ckpt/sd-vae-ft-ema --workdir runs/dit_xl2_512

`configs/dit_imagenet512.py:model=DiT-L/2` picks another model. DiT's
XL/2-512 model was trained for 3M steps; total_steps stays 7M (override).
"""
from jdit.config_util import sibling_config


def get_config(arg: str | None = None):
  return sibling_config(__file__, "dit_imagenet256",
                        ",".join(p for p in ((arg or ""), "res=512") if p))
