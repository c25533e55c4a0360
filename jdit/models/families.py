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
  DiM-{S,B,L,XL}/2  bidirectional Mamba (state 16, expand 2, d_conv 3, as
      in DiM's released configs) in zigzag order. The DiM paper (Teng et al.
      2024) builds on U-ViT with long skips, learned row padding tokens, one
      scan direction per layer (rotating across layers) and no MLP, and
      defines its own sizes (DiM-Huge: 49 layers of width 1536, 860M
      params); we do not reproduce those: these are the DiT sizes with the
      mamba mixer (our choice), named as DiM-style models.
  PT-DiT-{S,B,L,XL,H}/2  PT-DiT (Wang et al. 2024, Qihoo-T2X, 2409.04005)
      with the paper's sizes (Table 4: S = its class-conditional ablation
      model 10/288/6, B 12/640/10, L 28/864/12, XL 28/1152/16, H 30/1440/20)
      in the DiT backbone, without the paper's T5 text cross-attention. The
      proxy mixer keeps the paper's 8x8 proxies at every resolution (2x2
      windows at 256px, 8x8 at 1024px) and its window attention uses the
      proxy windows (jdit/models/proxy_mixer.py). At equal width a PT-DiT
      block costs more than a DiT block below ~1000 tokens; the paper's
      savings over DiT/PixArt are at equal parameter count, i.e. a narrower
      PT-DiT (docs/benchmarks.md, FLOPs per image).
  DiT-XL/2-KVCompress  PixArt-Sigma's KV token compression (Chen et al.
      2024): keys and values downsampled 2x by a depthwise conv in the deeper
      blocks only (14-27 of 28, `mixer_layers`, as its released config);
      blocks 0-13 keep dense attention.
"""
from __future__ import annotations

from jdit.models.dit import DIT_SIZES, DIT_SMOKE, DiT
from jdit.models.registry import register_model

# PT-DiT sizes (depth, width, heads), Qihoo-T2X Table 4. Their params (32M,
# 144M, 605M, 1142M, 1795M) include the text cross-attention we leave out.
PT_DIT_SIZES = {"S": (10, 288, 6), "B": (12, 640, 10), "L": (28, 864, 12),
                "XL": (28, 1152, 16), "H": (30, 1440, 20)}


def _register(name, size, patch, mixer, options):
  depth, width, heads = DIT_SIZES[size]
  register_model(name, DiT, depth=depth, hidden_size=width, num_heads=heads,
                 patch_size=patch, mixer=mixer, mixer_options=options,
                 smoke=DIT_SMOKE)


for _size in DIT_SIZES:
  _register(f"DiT-{_size}/2-local", _size, 2, "local",
            {"window": 8, "shape": "circle"})
  _register(f"DiM-{_size}/2", _size, 2, "mamba",
            {"state": 16, "expand": 2, "d_conv": 3, "scan_order": "zigzag",
             "bidirectional": True})

_register("DiT-XL/2-linear", "XL", 2, "linear",
          {"feature_map": "relu", "conv_kernel": 3})
for _size, (_depth, _width, _heads) in PT_DIT_SIZES.items():
  # Smoke: 2x2 proxies, as 8x8 would not divide a small smoke grid.
  register_model(f"PT-DiT-{_size}/2", DiT, depth=_depth, hidden_size=_width,
                 num_heads=_heads, patch_size=2, mixer="proxy",
                 mixer_options={"proxy_grid": 8},
                 smoke={**DIT_SMOKE, "mixer_options": {"proxy_grid": 2}})
register_model("DiT-XL/2-KVCompress", DiT, depth=28, hidden_size=1152,
               num_heads=16, patch_size=2, mixer="kv_compress",
               mixer_options={"ratio": 2}, mixer_layers=tuple(range(14, 28)),
               smoke={**DIT_SMOKE, "mixer_layers": (0,)})

# The named efficient models, for tests, benchmarks and the FLOP CLI.
FAMILY_MODELS = (
    [f"DiT-{s}/2-local" for s in DIT_SIZES]
    + [f"DiM-{s}/2" for s in DIT_SIZES]
    + [f"PT-DiT-{s}/2" for s in PT_DIT_SIZES]
    + ["DiT-XL/2-linear", "DiT-XL/2-KVCompress"])
