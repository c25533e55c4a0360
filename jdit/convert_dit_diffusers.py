"""diffusers' DiTTransformer2DModel weights <-> the official DiT layout.

The Hugging Face Hub's `facebook/DiT-XL-2-256` (and -512) hold DiT's
released weights in diffusers' layout: separate q/k/v projections, the
timestep and label embedders copied into every block's `norm1.emb`, the
final layer as `proj_out_1/2`, and no stored position embedding.
`official_state_dict` rewrites such a state dict into facebookresearch/DiT's
keys (the embedders taken once, after checking that every block holds the
same), so that `jdit.convert_dit` converts it like the released .pt.

`diffusers_state_dict` and `diffusers_config` go the other way, for
`jdit.convert export --format diffusers`: a directory that
`DiTTransformer2DModel.from_pretrained` loads (and a DiTPipeline uses).

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


class _Rewriter:
  """Moves a state dict's tensors to new keys in `out`, remembering which
  were read (the rest is checked at the end); `missing` formats the error
  for a key that is not there."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], missing: str):
    self.sd, self.missing = state_dict, missing
    self.used: set[str] = set()
    self.out: dict[str, np.ndarray] = {}

  def take(self, key: str) -> np.ndarray:
    if key not in self.sd:
      raise CheckpointMismatchError(self.missing.format(key=key))
    self.used.add(key)
    return self.sd[key]

  def linear(self, src: str, dst: str) -> None:
    for part in ("weight", "bias"):
      self.out[f"{dst}.{part}"] = self.take(f"{src}.{part}")

  def unread(self) -> list[str]:
    return sorted(set(self.sd) - self.used)


def official_state_dict(state_dict: Mapping[str, Any],
                        sample_size: int) -> dict[str, np.ndarray]:
  """A DiTTransformer2DModel state dict -> DiT's keys (numpy float32).

  sample_size: the latent side (config.json's `sample_size`), which sets
  the position embedding diffusers computes rather than stores.
  """
  sd = {k: to_numpy(v) for k, v in state_dict.items()}
  depth = 1 + max(int(m.group(1)) for m in (
      re.match(r"transformer_blocks\.(\d+)\.", k) for k in sd) if m)
  r = _Rewriter(sd, "diffusers DiT checkpoint lacks {key}")
  take, linear, out = r.take, r.linear, r.out
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
  unexpected = r.unread()
  if unexpected:
    raise CheckpointMismatchError(
        f"diffusers DiT checkpoint has keys no DiT has ({len(unexpected)}): "
        f"{', '.join(unexpected[:10])}")
  width, _, patch, _ = out["x_embedder.proj.weight"].shape
  side = sample_size // patch
  out["pos_embed"] = sincos_2d(width, side, side)[None]
  return out


def diffusers_state_dict(state_dict: Mapping[str, np.ndarray], depth: int,
                         num_classes: int) -> dict[str, np.ndarray]:
  """The official DiT layout (jdit.convert_dit.dit_params_to_torch's) ->
  DiTTransformer2DModel's: the inverse of `official_state_dict`.

  diffusers always holds a null-class row (num_classes + 1 labels); a model
  trained without label dropout gets a zero row there. A REPA projector
  (training only) is left out; any other part a plain DiT lacks is refused.
  """
  r = _Rewriter(state_dict,
                "DiTTransformer2DModel needs {key}, which this model lacks")
  take, linear, out = r.take, r.linear, r.out
  linear("x_embedder.proj", "pos_embed.proj")
  table = take("y_embedder.embedding_table.weight")
  if len(table) == num_classes:
    table = np.concatenate([table, np.zeros_like(table[:1])])
  shared = {"class_embedder.embedding_table.weight": table}
  shared.update({f"{src}.{p}": take(f"{dst}.{p}")
                 for src, dst in _EMBEDDERS.items() for p in ("weight", "bias")})
  for i in range(depth):
    t, d = f"transformer_blocks.{i}.", f"blocks.{i}."
    out.update({f"{t}norm1.emb.{k}": v for k, v in shared.items()})
    for part in ("weight", "bias"):
      for name, w in zip("qkv", np.split(take(f"{d}attn.qkv.{part}"), 3)):
        out[f"{t}attn1.to_{name}.{part}"] = w
    for src, dst in _BLOCK.items():
      linear(d + dst, t + src)
  linear("final_layer.adaLN_modulation.1", "proj_out_1")
  linear("final_layer.linear", "proj_out_2")
  r.used.add("pos_embed")  # diffusers computes it from sample_size
  left = [k for k in r.unread() if not k.startswith("projectors.")]
  if left:
    raise CheckpointMismatchError(
        f"DiTTransformer2DModel has no place for {len(left)} of this model's "
        f"weights ({', '.join(left[:6])}): only a plain DiT converts")
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def diffusers_config(model) -> dict:
  """config.json of the DiTTransformer2DModel that holds jdit DiT `model`
  (DiT's LayerNorm eps 1e-6; GELU-tanh MLP of ratio 4)."""
  side = model.input_size
  if not isinstance(side, int):
    if len(set(side)) != 1:
      raise ValueError(f"DiTTransformer2DModel is square; this model's input "
                       f"is {tuple(side)}")
    side = side[0]
  if model.mlp_ratio != 4:
    raise ValueError(f"DiTTransformer2DModel's MLP is 4x wide; this model's "
                     f"is {model.mlp_ratio}x")
  return {
      "_class_name": "DiTTransformer2DModel",
      "_diffusers_version": "0.30.0",
      "num_attention_heads": model.num_heads,
      "attention_head_dim": model.hidden_size // model.num_heads,
      "in_channels": model.in_channels,
      "out_channels": model.out_channels,
      "num_layers": model.depth,
      "sample_size": int(side),
      "patch_size": model.patch_size,
      "num_embeds_ada_norm": model.num_classes,
      "activation_fn": "gelu-approximate",
      "norm_type": "ada_norm_zero",
      "norm_elementwise_affine": False,
      "norm_eps": 1e-6,
      "attention_bias": True,
      "dropout": 0.0,
  }
