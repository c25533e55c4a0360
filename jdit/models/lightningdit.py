"""LightningDiT: the DiT backbone with the "modern DiT" switches.

Yao, Yang & Wang, "Reconstruction vs. Generation: Taming Optimization
Dilemma in Latent Diffusion Models" (2025; hustvl/LightningDiT). Its final
recipe changes DiT's blocks in three ways, each a field or option of ours:
RMSNorm with a learned scale instead of the affine-free LayerNorm
(`norm="rms"`), a SwiGLU feed-forward of width int(2/3 * 4D)
(`mlp="swiglu"`), and 2D rotary position embedding in attention on top of
the absolute sin-cos table (`mixer_options={"rope": True}`); qk-norm was
tried and left out of the final model (`{"qk_norm": "rms"}` turns it on).
Sigma is not learned (rectified-flow / SiT velocity training).

Names and sizes follow the released code: B 12/768/12, L 24/1024/16,
XL 28/1152/16, 1p0B 24/1536/24, 1p6B 28/1792/28, patch 1 or 2. Defaults are
for VA-VAE f16d32 latents of 256px images (16x16x32); with the SD-VAE pass
in_channels=4, input_size=32. `python -m jdit.convert dit --model
LightningDiT-XL/1 --objective sit ...` converts the released checkpoints.
"""
from __future__ import annotations

from jdit.models.dit import DIT_SMOKE, DiT
from jdit.models.registry import register_model

LIGHTNING_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16),
                   "XL": (28, 1152, 16), "1p0B": (24, 1536, 24),
                   "1p6B": (28, 1792, 28)}
LIGHTNING_PATCHES = {"B": (1, 2), "L": (2,), "XL": (1, 2), "1p0B": (1, 2),
                     "1p6B": (1, 2)}
# The released final recipe (the config's use_swiglu, use_rope, use_rmsnorm).
MODERN_DIT = dict(norm="rms", mlp="swiglu", mixer_options={"rope": True},
                  learn_sigma=False)

for _size, (_depth, _width, _heads) in LIGHTNING_SIZES.items():
  for _patch in LIGHTNING_PATCHES[_size]:
    register_model(f"LightningDiT-{_size}/{_patch}", DiT, depth=_depth,
                   hidden_size=_width, num_heads=_heads, patch_size=_patch,
                   in_channels=32, input_size=16, **MODERN_DIT,
                   smoke=DIT_SMOKE)
