"""Named efficient-DiT models: the DiT backbone with a sparse token mixer.

Every name is a DiT (jdit/models/dit.py: adaLN-Zero blocks, sin-cos position
embedding, learned sigma) of the DiT paper's sizes (S 12/384/6, B 12/768/12,
L 24/1024/16, XL 28/1152/16) whose blocks use another registered mixer. Names
and mixer hyperparameters follow the papers where they define them; choices
of ours are marked. All defaults are for 256px images (32x32 latents, a 16x16
token grid at patch 2); pass input_size and mixer_options to change them.

  DiT-{S,B,L,XL}/2-local  CLEAR (Liu et al. 2024, "CLEAR: Conv-Like
      Linearization Revs Pre-Trained Diffusion Transformers Up"): circular
      local attention, radius 8 (CLEAR's smallest radius; on a 16x16 grid a
      query sees about 200 of 256 keys; the saving grows with resolution).
  DiT-XL/2-linear  ReLU linear attention with a 3x3 depthwise-conv local
      term, SANA-style (Xie et al. 2024). SANA's own models (Linear DiT with
      Mix-FFN, 32x DC-AE latents) are not reproduced; the name says "a DiT-XL/2
      with linear attention".
  DiM-{S,B,L,XL}/2  bidirectional Mamba (state 16, expand 2, d_conv 4) in
      zigzag order. The DiM paper (Teng et al. 2024) builds on U-ViT with
      long skips and learned row padding tokens and defines its own sizes;
      we do not reproduce those: these are the DiT sizes with the mamba
      mixer (our choice), named as DiM-style models.
  PT-DiT-XL/2  PT-DiT (Wang et al. 2024, Qihoo-T2X): proxy tokens from
      (1, 2, 2) windows at 256px as in the paper, plus window attention in
      8x8 windows with half the heads shifted by 4 (window size and the
      head-split shift are our choices; the paper uses Swin-style windows).
  DiT-XL/2-KVCompress  PixArt-Sigma's KV token compression (Chen et al.
      2024): keys and values downsampled 2x by a depthwise conv. PixArt-Sigma
      compresses only the deeper layers (14-27 of 28); the registry gives every
      block the same mixer, so here all layers compress (our choice).
"""
from __future__ import annotations

from jdit.models.dit import DIT_SIZES, DiT
from jdit.models.registry import register_model


def _register(name, size, patch, mixer, options):
  depth, width, heads = DIT_SIZES[size]
  register_model(name, DiT, depth=depth, hidden_size=width, num_heads=heads,
                 patch_size=patch, mixer=mixer, mixer_options=options)


for _size in DIT_SIZES:
  _register(f"DiT-{_size}/2-local", _size, 2, "local",
            {"window": 8, "shape": "circle"})
  _register(f"DiM-{_size}/2", _size, 2, "mamba",
            {"state": 16, "expand": 2, "d_conv": 4, "scan_order": "zigzag",
             "bidirectional": True})

_register("DiT-XL/2-linear", "XL", 2, "linear",
          {"feature_map": "relu", "conv_kernel": 3})
_register("PT-DiT-XL/2", "XL", 2, "proxy",
          {"proxy_window": 2, "window": 8, "shift": 4})
_register("DiT-XL/2-KVCompress", "XL", 2, "kv_compress", {"ratio": 2})

# The named efficient models, for tests, benchmarks and the FLOP CLI.
FAMILY_MODELS = (
    [f"DiT-{s}/2-local" for s in DIT_SIZES]
    + [f"DiM-{s}/2" for s in DIT_SIZES]
    + ["DiT-XL/2-linear", "PT-DiT-XL/2", "DiT-XL/2-KVCompress"])
