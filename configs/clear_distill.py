"""CLEAR: convert a pretrained DiT to local attention by distillation.

Liu, Tan & Wang, "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion
Transformers Up" (2024); see jdit/distill.py and docs/clear.md. The student
is the teacher's DiT with the `local` mixer (circle of radius `window` on the
token grid); it starts from the teacher's weights, and only its attention
layers (qkv, proj) are trained on samples the teacher generates, with the
denoising loss plus output and attention-output distillation.

Digits (the default; the teacher is the `python train.py` default model):

    python train.py --workdir runs/default                  # the teacher
    python train.py --config configs/clear_distill.py \\
        --config.distill.teacher=runs/default --workdir runs/clear_digits
    python sample.py --checkpoint runs/clear_digits --cfg_scale 2

ImageNet 256 (DiT-XL/2; convert the official checkpoint first):

    python -m jdit.convert dit --checkpoint DiT-XL-2-256x256.pt \\
        --model DiT-XL/2 --out /ckpt/dit_xl2_256
    python train.py --config configs/clear_distill.py:imagenet256 \\
        --config.distill.teacher=/ckpt/dit_xl2_256 \\
        --config.vae.path=/ckpt/sd-vae-ft-ema --workdir runs/clear_xl2
    python sample.py --checkpoint runs/clear_xl2 --cfg_scale 1.5 \\
        --steps 250

Options (comma-separated arg): `imagenet256`, `window=R` (the radius in
tokens). CLEAR uses r = 8, 16, 32 tokens on FLUX's 64x64 token grid (1024px
images); DiT-XL/2 at 256px has a 16x16 grid, where r = 8 is CLEAR's smallest
radius in tokens (most of the image; r = 2 would be the same fraction of the
grid as r = 8 on FLUX's). The digits model has a 4x4 grid: r = 1 sees the 4
nearest neighbours.
"""

import ml_collections

from jdit import distill
from jdit.config_util import sibling_config, split_arg


def _parse(arg: str | None) -> dict:
  words, kw = split_arg(arg, __file__, {"window": ""}, words=("imagenet256",))
  if kw["window"] and not kw["window"].isdigit():
    raise ValueError(f"configs/clear_distill.py: window must be an integer "
                     f"radius, got {kw['window']!r}")
  return {"imagenet256": "imagenet256" in words,
          "window": int(kw["window"]) if kw["window"] else None}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kw = _parse(arg)
  if kw["imagenet256"]:
    c = sibling_config(__file__, "dit_imagenet256")
    window = 8 if kw["window"] is None else kw["window"]
    c.total_steps = 10_000         # CLEAR: 10K iterations
    c.batch_size = 64
    c.log_every = 50
    c.checkpoint_every = 1000
    c.ema_decay = 0.999
    c.optim.lr = 1e-4
    num_samples, cfg_scale, steps = 10_000, 1.5, 250
  else:
    c = sibling_config(__file__, "default")
    window = 1 if kw["window"] is None else kw["window"]
    c.total_steps = 1000
    c.checkpoint_every = 500
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    num_samples, cfg_scale, steps = 2000, 2.0, 50
  c.model.mixer = "local"
  c.model.mixer_options = ml_collections.ConfigDict(
      {"window": window, "shape": "circle", "impl": "auto"})
  c.init_from = ""                 # "" = start from the teacher's weights

  c.distill = d = distill.default_config()
  d.teacher = ""                   # required: the teacher checkpoint
  d.num_samples = num_samples      # teacher-generated set (CLEAR: 10K)
  d.sampler = ""                   # "" = the teacher objective's default
  d.steps = steps                  # sampling steps per generated sample
  d.cfg_scale = cfg_scale          # guidance for the generated samples
  # Loss weights (CLEAR: 1, 0.5, 0.5) and the trained params ("attn" =
  # blocks_i/attn/{qkv,proj}) keep distill.default_config()'s values.
  return c
