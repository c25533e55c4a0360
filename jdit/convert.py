"""PyTorch checkpoints -> Flax params: official DiT and diffusers VAEs.

`dit_params_from_torch` maps a facebookresearch/DiT state dict (the released
bare EMA dict `DiT-XL-2-256x256.pt`, or a train.py checkpoint with "ema" and
"model"; SiT's and DiT-MoE's checkpoints share the layout) onto the
parameter tree of `jdit.models.build_model(name)`;
`vae_params_from_torch` (in jdit.convert_vae) does the same for diffusers'
AutoencoderKL. Both return plain nested dicts of float32 numpy arrays, and
both check the whole checkpoint before converting anything, so a wrong file
fails with one message listing every missing, unexpected and mis-shaped key.

Command line (see jdit/convert_cli.py):

  python -m jdit.convert dit --checkpoint DiT-XL-2-256x256.pt \
      --model DiT-XL/2 --vae sd-vae-ft-ema/ --out converted/dit_xl2_256
  python -m jdit.convert vae --checkpoint diffusion_pytorch_model.safetensors \
      --out converted/sd_vae_ft_ema
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit.models import build_model
from jdit.models.dit import DiT
from jdit.models.embed import sincos_2d

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not fit the requested model."""


def to_numpy(value) -> np.ndarray:
  """A torch tensor (any float dtype, any device) or array -> numpy float32."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating):
    value = value.astype(np.float32)
  return value


def load_state_dict(path: str) -> dict[str, Any]:
  """Reads a local .pt/.pth/.bin/.ckpt (torch) or .safetensors file.

  torch files are read with weights_only=True on the CPU, so a checkpoint
  cannot run code when loaded. Returns the object stored (usually a dict).
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    try:
      return dict(safetensors.numpy.load_file(path))
    except Exception:  # bf16 tensors need the torch reader
      import safetensors.torch  # pylint: disable=g-import-not-at-top
      return dict(safetensors.torch.load_file(path, device="cpu"))
  if lower.endswith(TORCH_SUFFIXES):
    import torch  # pylint: disable=g-import-not-at-top
    try:
      return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"could not read {path} as a torch checkpoint "
                       f"(weights_only=True): {e}") from e
  raise ValueError(f"unsupported checkpoint file {path}: expected one of "
                   f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}")


def unwrap_state_dict(obj: Any, prefer: tuple[str, ...] = ("ema", "model",
                                                           "state_dict")
                      ) -> dict[str, Any]:
  """The weights inside a checkpoint object: a bare dict or a train.py dict.

  DiT's train.py saves {"model", "ema", "opt", "args"}; sampling wants the EMA
  weights, as DiT's own `find_model` does. A "module." prefix (DDP) is removed.
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a "
                     f"dict of tensors")
  for key in prefer:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  sd = dict(obj)
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def check_keys(state_dict: Mapping[str, Any],
               expected: Mapping[str, tuple[int, ...]], what: str,
               ignore: Callable[[str], bool] = lambda k: False) -> None:
  """Raises CheckpointMismatchError naming every key that does not fit."""
  missing = sorted(k for k in expected if k not in state_dict)
  unexpected = sorted(k for k in state_dict
                      if k not in expected and not ignore(k))
  misshaped = sorted(
      f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, expected "
      f"{tuple(expected[k])}"
      for k in expected
      if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(
          expected[k]))
  if missing or unexpected or misshaped:
    parts = [f"checkpoint does not match {what}:"]
    for title, keys in (("missing keys", missing),
                        ("unexpected keys", unexpected),
                        ("mis-shaped keys", misshaped)):
      if keys:
        parts.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
    raise CheckpointMismatchError("\n".join(parts))


def abstract_params(module: nn.Module, *inputs, method=None) -> Any:
  """Unboxed parameter shapes of `module` without allocating them."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), *inputs, method=method))
  return nn.meta.unbox(shapes["params"])


# --- DiT ------------------------------------------------------------------


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
  for i in range(model.depth):
    t, f = f"blocks.{i}", (f"blocks_{i}",)
    out[f"{t}.attn.qkv.weight"] = ((3 * d, d), "qkv", f + ("attn", "qkv",
                                                           "kernel"))
    out[f"{t}.attn.qkv.bias"] = ((3 * d,), "qkv_bias", f + ("attn", "qkv",
                                                           "bias"))
    out[f"{t}.attn.proj.weight"] = ((d, d), "proj", f + ("attn", "proj",
                                                         "kernel"))
    out[f"{t}.attn.proj.bias"] = ((d,), "id", f + ("attn", "proj", "bias"))
    if moe is not None:
      out.update(_dit_moe_layout(d, moe, t, f + ("mlp",)))
    else:
      linear(f"{t}.mlp.fc1", f + ("mlp", "fc1"), hidden, d)
      linear(f"{t}.mlp.fc2", f + ("mlp", "fc2"), d, hidden)
    linear(f"{t}.adaLN_modulation.1", f + ("adaLN_modulation",), 6 * d, d)
  linear("final_layer.adaLN_modulation.1",
         ("final_layer", "adaLN_modulation"), 2 * d, d)
  linear("final_layer.linear", ("final_layer", "linear"), p * p * c_out, d)
  del heads
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


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """tree[path[0]][path[1]]... = value, creating the nested dicts."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def torch_to_flax(value, kind: str) -> np.ndarray:
  """One PyTorch weight in Flax layout, float32.

  kind "conv": Conv2d (out, in, kh, kw) -> (kh, kw, in, out); "linear":
  Linear (out, in) -> Dense (in, out); anything else is kept as it is.
  """
  w = to_numpy(value)
  if kind == "conv":
    w = w.transpose(2, 3, 1, 0)
  elif kind == "linear":
    w = w.T
  return np.ascontiguousarray(w, dtype=np.float32)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _has(tree, path) -> bool:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def _infer_input_size(sd: Mapping[str, Any], patch_size: int) -> int | None:
  """The latent side from pos_embed's token count (square grids)."""
  if "pos_embed" not in sd:
    return None
  tokens = int(np.shape(sd["pos_embed"])[-2])
  side = int(round(tokens ** 0.5))
  return side * patch_size if side * side == tokens else None


def resolve_dit_overrides(state_dict: Mapping[str, Any], name: str,
                          **overrides) -> dict:
  """`overrides` plus input_size from pos_embed when not given."""
  if "input_size" not in overrides:
    size = _infer_input_size(unwrap_state_dict(state_dict),
                             build_model(name).patch_size)
    if size is not None:
      overrides = dict(overrides, input_size=size)
  return overrides


def dit_params_from_torch(state_dict: Mapping[str, Any], name: str,
                          **overrides) -> dict:
  """Converts an official facebookresearch/DiT checkpoint to Flax params.

  Also SiT's (willisma/SiT: DiT's layout) and DiT-MoE's (feizc/DiT-MoE:
  `blocks.i.moe.*` instead of `blocks.i.mlp.*`, for a "DiT-MoE-*" name).

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
  if not isinstance(model, DiT):
    raise ValueError(f"{name} is not a DiT; only the official DiT layout "
                     f"converts")
  if model.mixer != "attention" or model.mlp not in ("dense", "moe"):
    raise ValueError("official DiT checkpoints need mixer='attention' and "
                     "mlp='dense' (DiT, SiT) or 'moe' (DiT-MoE)")
  layout = _dit_torch_layout(model)
  check_keys(sd, {k: v[0] for k, v in layout.items()},
             f"{name} with {dict(overrides)}")

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
    if kind == "qkv":  # timm: output index = (s, head, dim), s in q, k, v
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


def vae_params_from_torch(state_dict: Mapping[str, Any], **config) -> dict:
  """diffusers AutoencoderKL weights -> Flax params (see jdit.convert_vae)."""
  from jdit import convert_vae  # pylint: disable=g-import-not-at-top
  return convert_vae.vae_params_from_torch(state_dict, **config)


if __name__ == "__main__":
  from jdit import convert_cli  # pylint: disable=g-import-not-at-top
  convert_cli.main()
