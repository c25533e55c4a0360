"""LaMamba-Diff (Fu et al. 2024): local attention + Mamba in a U-Net.

    python train.py --config configs/lamamba.py              # digits, CPU
    python train.py --config configs/lamamba.py:imagenet256 \\
        --config.data.data_dir=/data/latents/imagenet256 \\
        --config.vae.path=/ckpt/sd-vae-ft-mse --workdir runs/lamamba_xl_256
    python train.py --config configs/lamamba.py:imagenet512   # XL, 64x64x4
    python train.py --config configs/lamamba.py:imagenet256,model=LaMamba-Diff-B

Sizes: the paper defines LaMamba-Diff-S, -B, -L and -XL; only XL's
configuration is public (width 320, 16 heads, d_state 1), the S/B/L widths
are our choice, matching the DiT of the same letter in parameters (SIZES in
jdit/models/lamamba.py). Every size uses the paper's SS2D Mamba mixer.

"digits" (the default) is configs/default.py with a tiny LaMamba-Diff: 8x8
images at patch 1, two stages (8x8 then 4x4 tokens, widths 32 and 64),
4x4 windows, a one-block bottleneck: sized for a CPU (a test trains it 10
steps).

"imagenet256"/"imagenet512" take the data, VAE, mesh and sampling settings of
configs/dit_imagenet256.py (latents 32x32x4 / 64x64x4) and change what the
LaMamba-Diff code does differently from DiT's recipe: its train.py uses
torch AdamW at lr 1e-4 with torch's default weight decay 0.01, batch 256,
and its launch script trains 500 epochs (about 2.5M steps at batch 256)
with the sd-vae-ft-mse VAE. Latents extracted with another SD-VAE
checkpoint work the same (same scale factor). Everything else (DDPM with
learned sigma, EMA 0.9999, label dropout 0.1, constant lr) is DiT's.
"""
import ml_collections

from jdit.config_util import sibling_config, split_arg

VARIANTS = ("digits", "imagenet256", "imagenet512")
EPOCH_STEPS = 1_281_167 // 256  # ImageNet-1k train images / batch 256


def _parse(arg: str | None) -> tuple[str, dict]:
  words, kw = split_arg(arg, __file__, {"model": ""}, words=VARIANTS)
  return (words[-1] if words else "digits"), {k: v for k, v in kw.items()
                                              if v}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, kw = _parse(arg)
  if variant == "digits":
    c = sibling_config(__file__, "default")
    # A fresh model section: DiT's depth/hidden_size are not LaMamba fields.
    c.model = ml_collections.ConfigDict()
    c.model.name = kw.get("model", "LaMamba-Diff-S")
    c.model.input_size = 8
    c.model.in_channels = 1
    c.model.num_classes = 10
    c.model.patch_size = 1
    c.model.embed_dim = 32           # stage widths 32, 64
    c.model.depths = (1, 1)
    c.model.num_downsamples = 1      # 8x8 tokens, then 4x4
    c.model.bottleneck_depth = 1
    c.model.num_heads = 2
    c.model.window_size = 4          # 4x4 windows; the 4x4 stage is global
    c.model.learn_sigma = ml_collections.FieldReference(None,
                                                        field_type=bool)
    c.model.class_dropout_prob = 0.1
    c.model.dtype = "float32"
    c.model.remat = "none"
    return c

  res = int(variant[len("imagenet"):])
  c = sibling_config(__file__, "dit_imagenet256", f"res={res}")
  c.model.name = kw.get("model", "LaMamba-Diff-XL")
  c.total_steps = 500 * EPOCH_STEPS  # train_lamamba.sh: 500 epochs
  c.optim.weight_decay = 0.01        # torch AdamW default (official train.py)
  c.vae.path = ""                    # official: stabilityai/sd-vae-ft-mse
  return c
