"""Official DiT-family PyTorch checkpoints -> Flax params (jdit.convert).

The layout table `_dit_torch_layout` lists every key of a
facebookresearch/DiT-layout checkpoint for a given model (with DiT-MoE's
`moe.*` and LightningDiT's norms, SwiGLU and RoPE tables where the model
has them); `dit_params_from_torch` checks the whole checkpoint against it
and converts. Use it through `jdit.convert.dit_params_from_torch`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdit.convert import (CheckpointMismatchError, _get, _has, abstract_params,
                          check_keys, set_path, to_numpy, torch_to_flax,
                          unwrap_state_dict)
from jdit.models import build_model
from jdit.models.dit import DiT
from jdit.models.embed import rotary_tables, sincos_2d


def _dit_torch_layout(model: DiT) -> dict[str, tuple[tuple[int, ...], str,
                                                      tuple[str, ...]]]:
  """Official key -> (torch shape, transform, Flax path) for `model`."""
  d, p = model.hidden_size, model.patch_size
  c, c_out = model.in_channels, model.out_channels
  heads = model.num_heads
  hidden = int(d * model.mlp_ratio)
  gh, gw = model.grid_shape
  rows = model.num_classes + int(model.class_dropout_prob > 0)
  out = {
      "pos_embed": ((1, gh * gw, d), "pos", ()),
      "x_embedder.proj.weight": ((d, c, p, p), "conv", ("x_embedder", "proj",
                                                        "kernel")),
      "x_embedder.proj.bias": ((d,), "id", ("x_embedder", "proj", "bias")),
      "y_embedder.embedding_table.weight": ((rows, d), "id",
                                            ("y_embedder", "embedding")),
  }

  def linear(tkey, fpath, n_out, n_in):
    out[f"{tkey}.weight"] = ((n_out, n_in), "linear", fpath + ("kernel",))
    out[f"{tkey}.bias"] = ((n_out,), "id", fpath + ("bias",))

  linear("t_embedder.mlp.0", ("t_embedder", "fc1"), d, 256)
  linear("t_embedder.mlp.2", ("t_embedder", "fc2"), d, d)
  moe = _dit_moe_feedforward(model) if model.mlp == "moe" else None
  def norm(tkey, fpath):  # LightningDiT's RMSNorm has a scale; LN none
    if model.norm == "rms":
      out[f"{tkey}.weight"] = ((d,), "id", fpath + ("scale",))

  for i in range(model.depth):
    t, f = f"blocks.{i}", (f"blocks_{i}",)
    norm(f"{t}.norm1", f + ("norm1",))
    norm(f"{t}.norm2", f + ("norm2",))
    qk_norm = dict(model.block_mixer(i)[1] or {}).get("qk_norm")
    for which in ("q_norm", "k_norm") if qk_norm else ():
      hd = d // heads
      out[f"{t}.attn.{which}.weight"] = ((hd,), "id", f + ("attn", which,
                                                           "scale"))
      if qk_norm == "layer":
        out[f"{t}.attn.{which}.bias"] = ((hd,), "id", f + ("attn", which,
                                                           "bias"))
    out[f"{t}.attn.qkv.weight"] = ((3 * d, d), "qkv", f + ("attn", "qkv",
                                                           "kernel"))
    out[f"{t}.attn.qkv.bias"] = ((3 * d,), "qkv_bias", f + ("attn", "qkv",
                                                           "bias"))
    out[f"{t}.attn.proj.weight"] = ((d, d), "proj", f + ("attn", "proj",
                                                         "kernel"))
    out[f"{t}.attn.proj.bias"] = ((d,), "id", f + ("attn", "proj", "bias"))
    if moe is not None:
      out.update(_dit_moe_layout(d, moe, t, f + ("mlp",)))
    elif model.mlp == "swiglu":  # w12 = [W1; W2] rows, as (d, 2, width)
      width = model.feedforward().width
      out[f"{t}.mlp.w12.weight"] = ((2 * width, d), "w12",
                                    f + ("mlp", "w12", "kernel"))
      out[f"{t}.mlp.w12.bias"] = ((2 * width,), "w12_bias",
                                  f + ("mlp", "w12", "bias"))
      linear(f"{t}.mlp.w3", f + ("mlp", "w3"), d, width)
    else:
      linear(f"{t}.mlp.fc1", f + ("mlp", "fc1"), hidden, d)
      linear(f"{t}.mlp.fc2", f + ("mlp", "fc2"), d, hidden)
    linear(f"{t}.adaLN_modulation.1", f + ("adaLN_modulation",), 6 * d, d)
  norm("final_layer.norm_final", ("final_layer", "norm_final"))
  linear("final_layer.adaLN_modulation.1",
         ("final_layer", "adaLN_modulation"), 2 * d, d)
  linear("final_layer.linear", ("final_layer", "linear"), p * p * c_out, d)
  return out


def _dit_moe_feedforward(model):
  """The model's MoE layer (unbound), checked against DiT-MoE's layer.

  feizc/DiT-MoE's SparseMoeBlock: a bias-free router over E SwiGLU experts
  (bias-free gate/up/down projections), raw softmax gates of the top k, and
  shared experts fused into one SwiGLU. Its inference never drops a token,
  nor does ours (the MoE's default eval_capacity_factor).
  """
  moe = model.feedforward()
  wanted = dict(expert_act="swiglu", router_input="tokens", renormalize=False)
  wrong = {k: getattr(moe, k) for k, v in wanted.items()
           if getattr(moe, k) != v}
  if wrong:
    raise ValueError(f"DiT-MoE checkpoints need mlp_options {wanted}, got "
                     f"{wrong}")
  return moe


def _dit_moe_layout(d, moe, t, f):
  """DiT-MoE's `blocks.i.moe.*` keys of one block of width d."""
  e, h = moe.num_experts, moe.expert_width
  out = {f"{t}.moe.gate.weight": ((e, d), "linear", f + ("router", "kernel"))}
  for j in range(e):
    for name, shape, ours in (("gate_proj", (h, d), "gate_kernel"),
                              ("up_proj", (h, d), "up_kernel"),
                              ("down_proj", (d, h), "down_kernel")):
      # "expert:j:E": row j of the stacked (E, in, out) parameter.
      out[f"{t}.moe.experts.{j}.{name}.weight"] = (shape, f"expert:{j}:{e}",
                                                   f + (ours,))
  if moe.num_shared_experts:
    width = moe.num_shared_experts * (moe.shared_expert_hidden or h)
    for name, shape, ours in (("gate_proj", (width, d), "shared_gate"),
                              ("up_proj", (width, d), "shared_up"),
                              ("down_proj", (d, width), "shared_down")):
      out[f"{t}.moe.shared_experts.{name}.weight"] = (shape, "linear",
                                                      f + (ours, "kernel"))
  return out


def _infer_input_size(sd: Mapping[str, Any], patch_size: int) -> int | None:
  """The latent side from pos_embed's token count (square grids)."""
  if "pos_embed" not in sd:
    return None
  tokens = int(np.shape(sd["pos_embed"])[-2])
  side = int(round(tokens ** 0.5))
  return side * patch_size if side * side == tokens else None


def _infer_depth(sd: Mapping[str, Any]) -> int | None:
  """The number of blocks, from the highest "blocks.<i>." key."""
  found = [re.match(r"blocks\.(\d+)\.", k) for k in sd]
  return max((int(m.group(1)) for m in found if m), default=-1) + 1 or None


def resolve_dit_overrides(state_dict: Mapping[str, Any], name: str,
                          **overrides) -> dict:
  """`overrides` plus input_size from pos_embed and depth from the blocks
  when not given: depth-pruned checkpoints (TinyFusion's TinyDiT-D14 of
  DiT-XL/2) convert under their parent's name."""
  sd = unwrap_state_dict(state_dict)
  named = build_model(name)
  if "input_size" not in overrides:
    size = _infer_input_size(sd, named.patch_size)
    if size is not None:
      overrides = dict(overrides, input_size=size)
  depth = _infer_depth(sd)
  if "depth" not in overrides and depth and depth != named.depth:
    overrides = dict(overrides, depth=depth)
  return overrides


# LightningDiT stores its 2D RoPE tables (EVA-02's VisionRotaryEmbeddingFast)
# as buffers; we compute them, so they are compared, not converted.
ROPE_BUFFERS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
REPA_PROJECTOR_PREFIX = "projectors."  # REPA's MLPs, used only in training


def _uses_rope(model: DiT) -> bool:
  return any(dict(model.block_mixer(i)[1] or {}).get("rope")
             for i in range(model.depth))


def _check_rope_buffers(sd: Mapping[str, Any], model: DiT, name: str):
  """A checkpoint's RoPE tables must be ours (same layout, grid, head_dim)."""
  present = [k for k in ROPE_BUFFERS if k in sd]
  if not present or not _uses_rope(model):
    return
  tables = dict(zip(ROPE_BUFFERS, rotary_tables(
      model.grid_shape, model.hidden_size // model.num_heads)))
  for key in present:
    w, ours = to_numpy(sd[key]), tables[key]
    if w.shape != ours.shape or not np.allclose(w, ours, atol=5e-3):
      raise CheckpointMismatchError(
          f"checkpoint {key} {w.shape} differs from the rotary table "
          f"{ours.shape} of {name} on a {model.grid_shape} grid; the "
          f"checkpoint was trained with another RoPE layout or grid size")


def _check_official_layout(model, name: str) -> None:
  """Only models the official layouts describe convert, either way."""
  if not isinstance(model, DiT):
    raise ValueError(f"{name} is not a DiT; only the official DiT layout "
                     f"converts")
  if model.mixer != "attention" or model.mlp not in ("dense", "moe",
                                                     "swiglu"):
    raise ValueError(f"{name} has mixer={model.mixer!r}, mlp={model.mlp!r}; "
                     f"official DiT checkpoints need mixer='attention' and "
                     f"mlp='dense' (DiT, SiT), 'moe' (DiT-MoE) or 'swiglu' "
                     f"(LightningDiT)")


def dit_params_from_torch(state_dict: Mapping[str, Any], name: str,
                          **overrides) -> dict:
  """Converts an official facebookresearch/DiT checkpoint to Flax params.

  Also SiT's (willisma/SiT: DiT's layout), DiT-MoE's (feizc/DiT-MoE:
  `blocks.i.moe.*` instead of `blocks.i.mlp.*`, for a "DiT-MoE-*" name) and
  LightningDiT's (hustvl/LightningDiT, for a "LightningDiT-*" name: RMSNorm
  weights, SwiGLU `mlp.w12`/`mlp.w3`, optional q/k norms; its stored RoPE
  tables are checked against ours).

  Args:
    state_dict: the loaded checkpoint: a bare state dict (the released
      `DiT-XL-2-{256,512}.pt` are EMA weights) or DiT train.py's dict with
      "ema" (used) and "model". Values are torch tensors or numpy arrays.
    name: the model name, e.g. "DiT-XL/2" or "DiT-MoE-S/2-8E2A".
    **overrides: build_model overrides (input_size, in_channels, num_classes,
      learn_sigma, ...). input_size defaults to the one the checkpoint's
      pos_embed implies (32 for 256x256 images, 64 for 512x512).

  Returns:
    Plain nested dict of float32 numpy arrays with the tree structure of
    `build_model(name, **overrides).init(...)["params"]` (unboxed).

  Raises:
    CheckpointMismatchError: keys missing, unexpected or mis-shaped (all of
      them listed), or pos_embed differs from the model's sin-cos table.
  """
  sd = unwrap_state_dict(state_dict)
  overrides = resolve_dit_overrides(sd, name, **overrides)
  model = build_model(name, **overrides)
  _check_official_layout(model, name)
  layout = _dit_torch_layout(model)
  check_keys(sd, {k: v[0] for k, v in layout.items()},
             f"{name} with {dict(overrides)}",
             ignore=lambda k: (k in ROPE_BUFFERS and _uses_rope(model))
             # REPA checkpoints (SiT + REPA): the training-only projector.
             or k.startswith(REPA_PROJECTOR_PREFIX))
  _check_rope_buffers(sd, model, name)

  d, heads = model.hidden_size, model.num_heads
  gh, gw = model.grid_shape
  params: dict = {}
  for key, (_, kind, path) in layout.items():
    w = to_numpy(sd[key])
    if kind == "pos":
      ours = sincos_2d(d, gh, gw)
      # 5e-3 admits bf16/fp16-stored checkpoints; a different grid or
      # embedding layout differs by O(1).
      if not np.allclose(w[0], ours, atol=5e-3):
        err = float(np.max(np.abs(w[0] - ours)))
        raise CheckpointMismatchError(
            f"checkpoint pos_embed differs from the fixed sin-cos embedding "
            f"of {name} on a {gh}x{gw} grid (max abs difference {err:.3g}); "
            f"the checkpoint was trained with another position embedding "
            f"or grid size")
      continue
    if kind == "w12":  # rows [W1; W2] -> (d, 2, width)
      w = w.T.reshape(d, 2, -1)
    elif kind == "w12_bias":
      w = w.reshape(2, -1)
    elif kind == "qkv":  # timm: output index = (s, head, dim), s in q, k, v
      w = w.T.reshape(d, 3, heads, d // heads)
    elif kind == "qkv_bias":
      w = w.reshape(3, heads, d // heads)
    elif kind == "proj":  # input index = (head, dim)
      w = w.T.reshape(heads, d // heads, d)
    elif kind.startswith("expert:"):  # one expert of a stacked parameter
      _, j, e = kind.split(":")
      if not _has(params, path):
        set_path(params, path, np.zeros((int(e),) + w.T.shape, np.float32))
      _get(params, path)[int(j)] = w.T
      continue
    set_path(params, path, torch_to_flax(w, kind))

  # The layout table mirrors the model; a model change that breaks the
  # correspondence must fail here, not produce silently wrong samples.
  shapes = abstract_params(model, jnp.zeros((1,) + model.input_shape),
                           jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  expected = jax.tree_util.tree_structure(shapes)
  got = jax.tree_util.tree_structure(params)
  if expected != got:
    raise AssertionError(f"converter out of date with the model: {got} vs "
                         f"{expected}")
  for path_keys, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    path = tuple(k.key for k in path_keys)
    if _get(params, path).shape != leaf.shape:
      raise AssertionError(f"converter out of date with the model at {path}")
  return params



def dit_params_to_torch(params: Mapping[str, Any], model: DiT,
                        name: str = "the model") -> dict[str, np.ndarray]:
  """Flax params of `model` -> its official PyTorch state dict (numpy).

  The inverse of `dit_params_from_torch`, over the same layout table: what
  facebookresearch/DiT's models.py (and SiT's, DiT-MoE's, LightningDiT's)
  load with `load_state_dict(strict=True)`. pos_embed and LightningDiT's
  RoPE buffers are written from the model's fixed tables; a REPA projector
  becomes REPA's `projectors.0.{0,2,4}` (its released SiT loads them).
  """
  _check_official_layout(model, name)
  out = {}
  for key, (shape, kind, path) in _dit_torch_layout(model).items():
    if kind == "pos":
      w = sincos_2d(model.hidden_size, *model.grid_shape)[None]
    elif kind.startswith("expert:"):  # row j of the stacked (E, in, out)
      w = np.asarray(_get(params, path))[int(kind.split(":")[1])].T
    else:
      w = np.asarray(_get(params, path))
      if kind == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
        w = w.transpose(3, 2, 0, 1)
      elif kind in ("linear", "qkv", "proj", "w12"):  # Dense (in.., out..)
        w = w.reshape(shape[::-1]).T
      else:  # biases, tables and norm scales: same values, torch's shape
        w = w.reshape(shape)
    if w.shape != shape:
      raise AssertionError(f"converter out of date with the model at {key}: "
                           f"{w.shape} vs {shape}")
    out[key] = w
  if _uses_rope(model):
    out.update(zip(ROPE_BUFFERS, rotary_tables(
        model.grid_shape, model.hidden_size // model.num_heads)))
  for i in range(3) if "repa_projector" in params else ():
    dense = params["repa_projector"][f"fc{i + 1}"]
    prefix = f"{REPA_PROJECTOR_PREFIX}0.{2 * i}"
    out[f"{prefix}.weight"] = np.asarray(dense["kernel"]).T
    out[f"{prefix}.bias"] = np.asarray(dense["bias"])
  return {k: np.array(v, np.float32, order="C") for k, v in out.items()}
