"""diffusers' DiTTransformer2DModel weights -> the official DiT layout.

The Hugging Face Hub's `facebook/DiT-XL-2-256` (and -512) hold DiT's
released weights in diffusers' layout: separate q/k/v projections, the
timestep and label embedders copied into every block's `norm1.emb`, the
final layer as `proj_out_1/2`, and no stored position embedding.
`official_state_dict` rewrites such a state dict into facebookresearch/DiT's
keys (the embedders taken once, after checking that every block holds the
same), so that `jdit.convert_dit` converts it like the released .pt.

The result is DiT's forward pass, not diffusers': diffusers computes the
timestep frequencies with `downscale_freq_shift=1` (exponent / (half - 1)
where DiT divides by half) and normalises before the MLP with eps 1e-5
(DiT: 1e-6). The weights were trained with DiT's, which jdit keeps; the
test compares with diffusers set to DiT's values.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jdit.convert import CheckpointMismatchError, to_numpy
from jdit.models.embed import sincos_2d

DIFFUSERS_MARKER = "transformer_blocks.0.attn1.to_q.weight"
_EMBEDDERS = {  # diffusers (under transformer_blocks.i.norm1.emb.) -> DiT
    "timestep_embedder.linear_1": "t_embedder.mlp.0",
    "timestep_embedder.linear_2": "t_embedder.mlp.2",
}
_BLOCK = {  # diffusers (under transformer_blocks.i.) -> DiT (blocks.i.)
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}


def is_diffusers_dit(state_dict: Mapping[str, Any]) -> bool:
  return DIFFUSERS_MARKER in state_dict


def official_state_dict(state_dict: Mapping[str, Any],
                        sample_size: int) -> dict[str, np.ndarray]:
  """A DiTTransformer2DModel state dict -> DiT's keys (numpy float32).

  sample_size: the latent side (config.json's `sample_size`), which sets
  the position embedding diffusers computes rather than stores.
  """
  sd = {k: to_numpy(v) for k, v in state_dict.items()}
  depth = 1 + max(int(m.group(1)) for m in (
      re.match(r"transformer_blocks\.(\d+)\.", k) for k in sd) if m)
  out, used = {}, set()

  def take(key):
    if key not in sd:
      raise CheckpointMismatchError(f"diffusers DiT checkpoint lacks {key}")
    used.add(key)
    return sd[key]

  def linear(src, dst):
    for part in ("weight", "bias"):
      out[f"{dst}.{part}"] = take(f"{src}.{part}")

  linear("pos_embed.proj", "x_embedder.proj")
  emb = "transformer_blocks.{}.norm1.emb."
  pairs = [(f"{src}.{p}", f"{dst}.{p}") for src, dst in _EMBEDDERS.items()
           for p in ("weight", "bias")]
  pairs.append(("class_embedder.embedding_table.weight",
                "y_embedder.embedding_table.weight"))
  for src, dst in pairs:
    out[dst] = take(emb.format(0) + src)
    for i in range(1, depth):
      if not np.array_equal(take(emb.format(i) + src), out[dst]):
        raise CheckpointMismatchError(
            f"block {i}'s {src} differs from block 0's: not a DiT (whose "
            f"blocks share one timestep and label embedder)")
  for i in range(depth):
    t, d = f"transformer_blocks.{i}.", f"blocks.{i}."
    for part in ("weight", "bias"):
      out[f"{d}attn.qkv.{part}"] = np.concatenate(
          [take(f"{t}attn1.to_{s}.{part}") for s in "qkv"])
    for src, dst in _BLOCK.items():
      linear(t + src, d + dst)
  linear("proj_out_1", "final_layer.adaLN_modulation.1")
  linear("proj_out_2", "final_layer.linear")
  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise CheckpointMismatchError(
        f"diffusers DiT checkpoint has keys no DiT has ({len(unexpected)}): "
        f"{', '.join(unexpected[:10])}")
  width, _, patch, _ = out["x_embedder.proj.weight"].shape
  side = sample_size // patch
  out["pos_embed"] = sincos_2d(width, side, side)[None]
  return out
