"""DINOv2 weights from PyTorch: torch.hub's state dicts -> jdit.dinov2.DINOv2.

`load_dinov2(path)` reads dinov2_vits14/vitb14/vitl14/vitg14_pretrain.pth
(and the `_reg4` variants); the architecture is read off the weights.
Parameter names follow the torch keys: `blocks.3.attn.qkv.weight` is
params["blocks_3"]["attn"]["qkv"]["kernel"] (transposed), `ls1.gamma` is
["ls1"]["gamma"], `patch_embed.proj` is ["patch_embed"], `norm` is ["norm"].
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jdit import convert
from jdit.dinov2 import HEAD_DIM, DINOv2, ffn_hidden


_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")
_IGNORED = ("mask_token",)  # used only for masked-image training


def _dinov2_weights(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The backbone's keys, with block chunks (BlockChunk) flattened.

  Accepts the torch.hub file (a bare dict), a dict under "model",
  "teacher" or "state_dict", and a training checkpoint's "backbone." keys.
  """
  sd = convert.unwrap_state_dict(state_dict, ("teacher", "model",
                                              "state_dict"))
  if "cls_token" not in sd and "backbone.cls_token" in sd:
    sd = {k[len("backbone."):]: v for k, v in sd.items()
          if k.startswith("backbone.")}
  out = {}
  for key, value in sd.items():
    # A chunked checkpoint (block_chunks > 0) names block j of chunk c
    # blocks.c.j.*, where j already counts from the first block.
    match = _CHUNKED.match(key)
    if match:
      key = f"blocks.{match.group(2)}.{match.group(3)}"
      if key in out:
        raise convert.CheckpointMismatchError(
            f"block key {key} appears in two block chunks")
    out[key] = value
  return out


def module_for(state_dict: Mapping[str, Any]) -> DINOv2:
  """The DINOv2 whose architecture the (flattened) weights describe."""
  sd = state_dict
  shape = lambda key: tuple(int(n) for n in np.shape(sd[key]))
  missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")
             if k not in sd]
  if missing:
    raise convert.CheckpointMismatchError(
        f"not a DINOv2 state dict: missing keys {missing}; first keys: "
        f"{', '.join(sorted(sd)[:8])}")
  d = shape("cls_token")[-1] if shape("cls_token") else 0
  if d < 1 or d % HEAD_DIM:
    raise convert.CheckpointMismatchError(
        f"cls_token has shape {shape('cls_token')}, expected (1, 1, D) with "
        f"D a multiple of DINOv2's head width {HEAD_DIM}")
  pos, proj = shape("pos_embed"), shape("patch_embed.proj.weight")
  m = math.isqrt(max(pos[1] - 1, 0)) if len(pos) == 3 else 0
  if len(pos) != 3 or pos[1] != 1 + m * m or m < 1:
    raise convert.CheckpointMismatchError(
        f"pos_embed has shape {pos}, expected (1, 1 + M * M, {d}) for an "
        f"M x M patch grid")
  if len(proj) != 4 or proj[2] != proj[3]:
    raise convert.CheckpointMismatchError(
        f"patch_embed.proj.weight has shape {proj}, expected ({d}, 3, p, p)")
  depth = 0
  while any(k.startswith(f"blocks.{depth}.") for k in sd):
    depth += 1
  if "blocks.0.mlp.w12.weight" in sd:
    ffn, hidden = "swiglu", shape("blocks.0.mlp.w12.weight")[0] // 2
    ratio = hidden * 1.5 / d
  elif "blocks.0.mlp.fc1.weight" in sd:
    ffn, hidden = "mlp", shape("blocks.0.mlp.fc1.weight")[0]
    ratio = hidden / d
  else:
    raise convert.CheckpointMismatchError(
        "not a DINOv2 state dict: no blocks.0.mlp.fc1 (MLP) or "
        "blocks.0.mlp.w12 (SwiGLU) weights")
  if ffn_hidden(d, ratio, ffn) != hidden:
    raise convert.CheckpointMismatchError(
        f"blocks.0.mlp is {hidden} wide, which no mlp_ratio gives DINOv2's "
        f"{ffn} FFN of width {d}")
  reg = shape("register_tokens")[1] if "register_tokens" in sd else 0
  return DINOv2(hidden_size=d, depth=depth, num_heads=d // HEAD_DIM,
                num_register_tokens=reg, pos_grid=m, patch_size=proj[2],
                mlp_ratio=ratio, ffn=ffn)


def _layout(model: DINOv2) -> dict[str, tuple[tuple[int, ...], str,
                                              tuple[str, ...]]]:
  """torch key -> (torch shape, kind, Flax path)."""
  d, p, m = model.hidden_size, model.patch_size, model.pos_grid
  hidden = ffn_hidden(d, model.mlp_ratio, model.ffn)
  out = {
      "cls_token": ((1, 1, d), "id", ("cls_token",)),
      "pos_embed": ((1, 1 + m * m, d), "id", ("pos_embed",)),
      "patch_embed.proj.weight": ((d, 3, p, p), "conv",
                                  ("patch_embed", "kernel")),
      "patch_embed.proj.bias": ((d,), "id", ("patch_embed", "bias")),
  }
  if model.num_register_tokens:
    out["register_tokens"] = ((1, model.num_register_tokens, d), "id",
                              ("register_tokens",))

  def linear(tkey, fpath, dout, din):
    out[f"{tkey}.weight"] = ((dout, din), "linear", fpath + ("kernel",))
    out[f"{tkey}.bias"] = ((dout,), "id", fpath + ("bias",))

  def norm(tkey, fpath):
    out[f"{tkey}.weight"] = ((d,), "id", fpath + ("scale",))
    out[f"{tkey}.bias"] = ((d,), "id", fpath + ("bias",))

  for i in range(model.depth):
    t, f = f"blocks.{i}", (f"blocks_{i}",)
    norm(f"{t}.norm1", f + ("norm1",))
    linear(f"{t}.attn.qkv", f + ("attn", "qkv"), 3 * d, d)
    linear(f"{t}.attn.proj", f + ("attn", "proj"), d, d)
    norm(f"{t}.norm2", f + ("norm2",))
    if model.ffn == "swiglu":
      linear(f"{t}.mlp.w12", f + ("mlp", "w12"), 2 * hidden, d)
      linear(f"{t}.mlp.w3", f + ("mlp", "w3"), d, hidden)
    else:
      linear(f"{t}.mlp.fc1", f + ("mlp", "fc1"), hidden, d)
      linear(f"{t}.mlp.fc2", f + ("mlp", "fc2"), d, hidden)
    for ls in ("ls1", "ls2"):
      out[f"{t}.{ls}.gamma"] = ((d,), "id", f + (ls, "gamma"))
  norm("norm", ("norm",))
  return out


def params_from_torch(state_dict: Mapping[str, Any]
                      ) -> tuple[DINOv2, dict]:
  """DINOv2 torch weights -> (DINOv2 module, Flax params).

  Args:
    state_dict: the backbone's weights (torch tensors or numpy arrays), e.g.
      torch.hub's dinov2_vitb14_pretrain.pth or dinov2_vitl14_reg4_pretrain
      .pth; chunked blocks (blocks.c.j.*) are accepted.

  Returns:
    The module, its architecture read off the weights (width from
    cls_token, depth from the block count, heads of 64, registers, the
    stored position grid, MLP or SwiGLU FFN), and a plain nested dict of
    float32 numpy arrays for `module.apply({"params": params}, images)`.

  Raises:
    CheckpointMismatchError (a ValueError): not DINOv2 weights, or keys
      missing, unexpected or mis-shaped (all listed).
  """
  sd = _dinov2_weights(state_dict)
  model = module_for(sd)
  layout = _layout(model)
  convert.check_keys(
      sd, {k: v[0] for k, v in layout.items()},
      f"DINOv2 (width {model.hidden_size}, depth {model.depth}, "
      f"{model.num_register_tokens} registers, {model.ffn} FFN)",
      ignore=lambda k: k in _IGNORED)
  params: dict = {}
  for key, (_, kind, path) in layout.items():
    convert.set_path(params, path, convert.torch_to_flax(sd[key], kind))
  return model, params


def load_dinov2(path: str, dtype=jnp.float32) -> tuple[DINOv2, dict]:
  """(DINOv2 computing in `dtype`, float32 params) from a torch .pth file."""
  model, params = params_from_torch(convert.load_state_dict(path))
  return model.clone(dtype=dtype), params
