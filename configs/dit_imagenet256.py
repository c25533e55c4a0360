"""DiT-XL/2 on ImageNet 256x256 (SD-VAE latents 32x32x4): the DiT recipe.

1. Encode ImageNet once (ADM centre crop, both flips, posterior moments; see
   jdit/data/extract_latents.py). From the extracted image folder
   (train/<wnid>/*.JPEG, e.g. ILSVRC2012_img_train.tar unpacked):

     python -m jdit.data.extract_latents --source folder \\
         --folder /data/imagenet/train --image_size 256 \\
         --vae /ckpt/sd-vae-ft-ema --out /data/latents/imagenet256

   or from TFDS's imagenet2012 in ArrayRecord (no TensorFlow needed; build it
   from the ILSVRC tars with `python -m jdit.data.prepare_imagenet`):

     python -m jdit.data.extract_latents --source imagenet2012 \\
         --data_dir ~/tensorflow_datasets --image_size 256 \\
         --vae /ckpt/sd-vae-ft-ema --out /data/latents/imagenet256

   --vae takes a diffusers SD-VAE (e.g. stabilityai/sd-vae-ft-ema:
   config.json + diffusion_pytorch_model.safetensors) or a directory written
   by `python -m jdit.convert vae`. On a pod, run the same command on every
   host (--out on a shared filesystem); each host encodes its slice. A
   stopped extraction continues from its last closed shard when re-run.

2. Train (any number of devices; re-running the command resumes exactly):

     python train.py --config configs/dit_imagenet256.py \\
         --config.data.data_dir=/data/latents/imagenet256 \\
         --config.vae.path=/ckpt/sd-vae-ft-ema --workdir runs/dit_xl2_256

   Variants: `configs/dit_imagenet256.py:model=DiT-B/2`, and
   `configs/dit_imagenet256.py:res=512` (= configs/dit_imagenet512.py, 64x64x4
   latents from --image_size 512, dataset imagenet512_latents). At native
   aspect ratios: extract with `--buckets auto` (jdit/data/buckets.py) and
   train with `--config.data.name=latents` on that --out.

3. Sample: python sample.py --checkpoint runs/dit_xl2_256/checkpoints
   --cfg_scale 1.5 --steps 250 (decodes with config.vae).

Recipe (DiT paper, Peebles & Xie 2023, section 4): AdamW lr 1e-4 constant, no
weight decay, betas (0.9, 0.999), no warmup, batch 256, EMA 0.9999, label
dropout 0.1, DDPM with learned sigma (1000 linear steps). DiT's main table
uses 400K steps and its best XL/2 model 7M; total_steps is 7M as issue 5
asks, so stop earlier (or pass --config.total_steps=400000) for the table.
Compute in bfloat16 (params and optimizer in float32); DiT trained in fp32.
The published recipe has no gradient clipping (grad_clip = 0 here).
"""

import ml_collections

from jdit.config_util import sibling_config, split_arg

RESOLUTIONS = {256: "imagenet256_latents", 512: "imagenet512_latents"}


def _parse(arg: str | None) -> dict:
  _, kw = split_arg(arg, __file__, {"model": "DiT-XL/2", "res": "256"})
  if not kw["res"].isdigit() or int(kw["res"]) not in RESOLUTIONS:
    raise ValueError(f"configs/dit_imagenet256.py: res must be one of "
                     f"{sorted(RESOLUTIONS)}, got {kw['res']}")
  return kw


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kw = _parse(arg)
  res = int(kw["res"])
  c = sibling_config(__file__, "default")
  c.seed = 0
  c.batch_size = 256                 # global
  c.total_steps = 7_000_000          # issue 5; the DiT table is at 400K
  c.log_every = 100
  c.checkpoint_every = 50_000
  c.keep_checkpoints = 3
  c.objective = "ddpm"               # ADM diffusion, learned sigma

  c.model = ml_collections.ConfigDict()
  c.model.name = kw["model"]
  c.model.input_size = res // 8      # SD-VAE downsamples 8x
  c.model.in_channels = 4
  c.model.num_classes = 1000
  c.model.learn_sigma = True
  c.model.class_dropout_prob = 0.1
  c.model.dtype = "bfloat16"         # compute; params stay float32
  c.model.remat = "none"             # "full" trades ~30% speed for memory

  c.data.name = RESOLUTIONS[res]     # jdit.data.latents
  c.data.data_dir = ""               # the extract_latents --out directory
  c.data.split = "train"
  c.data.flip = False                # both flips are stored as examples

  # The VAE that encoded the latents: decodes samples (sample.py), and its
  # scale_factor is what the dataset multiplies latents by (checked against
  # the extraction's latent_stats.json when the dataset is opened).
  c.vae = ml_collections.ConfigDict()
  c.vae.path = ""                    # e.g. /ckpt/sd-vae-ft-ema
  c.vae.scale_factor = 0.18215       # SD-VAE's config value

  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.optim.grad_accum = 1
  c.ema_decay = 0.9999
  c.ema_warmup = False               # DiT: EMA = params at step 0, no warmup

  c.mesh = ml_collections.ConfigDict(
      {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})

  c.sample.per_class = 0             # no grid of 1000 classes at the end
  c.sample.sampler = "ddpm"
  c.sample.steps = 250
  c.sample.cfg_scale = 1.5

  # FID-10K of the EMA model during training (off by default), e.g.
  #   --config.eval.every=50000
  #   --config.eval.ref=/data/VIRTUAL_imagenet256_labeled.npz
  #   --config.eval.inception=/ckpt/pt_inception-2015-12-05-6726825d.pth
  # (512: VIRTUAL_imagenet512.npz). Needs config.vae.path to decode.
  c.eval.every = 0
  c.eval.num_samples = 10_000
  c.eval.ref = ""
  c.eval.inception = ""
  c.eval.batch_size = 256            # global; divisible by the device count
  c.eval.sampler = ""                # "" = sample.sampler (ddpm, 250 steps)
  c.eval.steps = 0
  c.eval.cfg_scale = 1.0             # DiT's training curves: no guidance
  return c
