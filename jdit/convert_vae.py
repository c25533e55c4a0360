"""diffusers AutoencoderKL weights -> Flax params for jdit.vae.AutoencoderKL.

Reads the diffusers layout of stabilityai/sd-vae-ft-ema and -mse (and any
AutoencoderKL of the same family: widths, depth and latent channels are read
off the weights). Attention weights may use the older diffusers names
(query/key/value/proj_attn, from checkpoints saved before diffusers 0.14) or
the newer ones (to_q/to_k/to_v/to_out.0), as Linear (C, C) or 1x1-conv
(C, C, 1, 1) tensors.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from jdit import convert
from jdit.vae import SD_VAE_SCALE_FACTOR, AutoencoderKL

# Old diffusers attention names -> new ones.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                  "proj_attn": "to_out.0"}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model.bin")


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames old attention keys and squeezes 1x1-conv attention weights."""
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if ".attentions." in key and len(parts) > 1 and (
        parts[-2] in _OLD_ATTENTION):
      parts[-2] = _OLD_ATTENTION[parts[-2]]
      key = ".".join(parts)
    if (".attentions." in key and key.endswith(".weight")
        and "group_norm" not in key and len(np.shape(value)) == 4):
      value = convert.to_numpy(value)[:, :, 0, 0]
    out[key] = value
  return out


def _count(sd, prefix):
  n = 0
  while any(k.startswith(f"{prefix}.{n}.") for k in sd):
    n += 1
  return n


def infer_config(state_dict: Mapping[str, Any]) -> dict:
  """AutoencoderKL fields (all but norm groups) read off the weights."""
  sd = state_dict
  needed = ("encoder.conv_in.weight", "decoder.conv_in.weight",
            "decoder.conv_out.weight")
  if not all(k in sd for k in needed):
    if any(k.startswith("encoder.down.") for k in sd):
      hint = ("it looks like an original CompVis/LDM first-stage checkpoint; "
              "convert it to the diffusers layout first (diffusers' "
              "convert_vae_pt_to_diffusers.py)")
    else:
      hint = "first keys: " + ", ".join(sorted(sd)[:8])
    raise convert.CheckpointMismatchError(
        f"not a diffusers AutoencoderKL state dict: missing "
        f"{[k for k in needed if k not in sd]}; {hint}")
  blocks = _count(sd, "encoder.down_blocks")
  if blocks == 0:
    raise convert.CheckpointMismatchError(
        "not a diffusers AutoencoderKL state dict: no encoder.down_blocks")
  chans = tuple(int(np.shape(sd[f"encoder.down_blocks.{i}.resnets.0.conv1."
                                 f"weight"])[0])
                if f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in sd
                else -1 for i in range(blocks))
  return dict(
      in_channels=int(np.shape(sd["encoder.conv_in.weight"])[1]),
      out_channels=int(np.shape(sd["decoder.conv_out.weight"])[0]),
      latent_channels=int(np.shape(sd["decoder.conv_in.weight"])[1]),
      block_out_channels=chans,
      layers_per_block=_count(sd, "encoder.down_blocks.0.resnets"),
      mid_block_attention=any(".mid_block.attentions.0." in k for k in sd),
      use_quant_conv="quant_conv.weight" in sd,
      use_post_quant_conv="post_quant_conv.weight" in sd)


def _layout(model: AutoencoderKL) -> dict[str, tuple[tuple[int, ...], str,
                                                      tuple[str, ...]]]:
  """diffusers key -> (torch shape, kind, Flax path)."""
  out = {}

  def conv(tkey, fpath, cout, cin, k=3):
    out[f"{tkey}.weight"] = ((cout, cin, k, k), "conv", fpath + ("kernel",))
    out[f"{tkey}.bias"] = ((cout,), "id", fpath + ("bias",))

  def norm(tkey, fpath, c):
    out[f"{tkey}.weight"] = ((c,), "id", fpath + ("scale",))
    out[f"{tkey}.bias"] = ((c,), "id", fpath + ("bias",))

  def resnet(tkey, fpath, cin, cout):
    norm(f"{tkey}.norm1", fpath + ("norm1",), cin)
    conv(f"{tkey}.conv1", fpath + ("conv1",), cout, cin)
    norm(f"{tkey}.norm2", fpath + ("norm2",), cout)
    conv(f"{tkey}.conv2", fpath + ("conv2",), cout, cout)
    if cin != cout:
      conv(f"{tkey}.conv_shortcut", fpath + ("conv_shortcut",), cout, cin, 1)

  def mid(tkey, fpath, c):
    resnet(f"{tkey}.resnets.0", fpath + ("resnets_0",), c, c)
    resnet(f"{tkey}.resnets.1", fpath + ("resnets_1",), c, c)
    if model.mid_block_attention:
      a, fa = f"{tkey}.attentions.0", fpath + ("attentions_0",)
      norm(f"{a}.group_norm", fa + ("group_norm",), c)
      for name in ("to_q", "to_k", "to_v", "to_out.0"):
        fname = name.split(".")[0]
        out[f"{a}.{name}.weight"] = ((c, c), "linear", fa + (fname, "kernel"))
        out[f"{a}.{name}.bias"] = ((c,), "id", fa + (fname, "bias"))

  chans = tuple(model.block_out_channels)
  lat = model.latent_channels
  enc, dec = ("encoder",), ("decoder",)
  conv("encoder.conv_in", enc + ("conv_in",), chans[0], model.in_channels)
  cin = chans[0]
  for i, ch in enumerate(chans):
    for j in range(model.layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}",
             enc + (f"down_blocks_{i}_resnets_{j}",), cin, ch)
      cin = ch
    if i < len(chans) - 1:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv",
           enc + (f"down_blocks_{i}_downsample",), ch, ch)
  mid("encoder.mid_block", enc + ("mid_block",), chans[-1])
  norm("encoder.conv_norm_out", enc + ("conv_norm_out",), chans[-1])
  conv("encoder.conv_out", enc + ("conv_out",), 2 * lat, chans[-1])
  if model.use_quant_conv:
    conv("quant_conv", ("quant_conv",), 2 * lat, 2 * lat, 1)
  if model.use_post_quant_conv:
    conv("post_quant_conv", ("post_quant_conv",), lat, lat, 1)
  rchans = tuple(reversed(chans))
  conv("decoder.conv_in", dec + ("conv_in",), rchans[0], lat)
  mid("decoder.mid_block", dec + ("mid_block",), rchans[0])
  cin = rchans[0]
  for i, ch in enumerate(rchans):
    for j in range(model.layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}",
             dec + (f"up_blocks_{i}_resnets_{j}",), cin, ch)
      cin = ch
    if i < len(rchans) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv",
           dec + (f"up_blocks_{i}_upsample",), ch, ch)
  norm("decoder.conv_norm_out", dec + ("conv_norm_out",), rchans[-1])
  conv("decoder.conv_out", dec + ("conv_out",), model.out_channels,
       rchans[-1])
  return out


def vae_params_from_torch(state_dict: Mapping[str, Any], **config) -> dict:
  """Converts diffusers AutoencoderKL weights to jdit.vae params.

  Args:
    state_dict: diffusers-format weights (torch tensors or numpy arrays),
      e.g. sd-vae-ft-ema's diffusion_pytorch_model.safetensors.
    **config: AutoencoderKL fields that cannot be read off the weights
      (norm_num_groups, 32 by default) or that must match them.

  Returns:
    Plain nested dict of float32 numpy arrays for
    `vae_module_for(state_dict, **config)`.

  Raises:
    CheckpointMismatchError: not an AutoencoderKL of this family, or keys
      missing, unexpected or mis-shaped (all listed).
  """
  model = vae_module_for(state_dict, **config)
  sd = normalize_keys(convert.unwrap_state_dict(state_dict, ("state_dict",)))
  layout = _layout(model)
  convert.check_keys(sd, {k: v[0] for k, v in layout.items()},
                     f"AutoencoderKL {convert_config(model)}")
  params: dict = {}
  for key, (_, kind, path) in layout.items():
    convert.set_path(params, path, convert.torch_to_flax(sd[key], kind))
  return params


def convert_config(model: AutoencoderKL) -> dict:
  return {k: getattr(model, k) for k in (
      "latent_channels", "block_out_channels", "layers_per_block",
      "norm_num_groups")}


def vae_module_for(state_dict: Mapping[str, Any], dtype=None, **config
                   ) -> AutoencoderKL:
  """The AutoencoderKL whose architecture the weights describe."""
  sd = normalize_keys(convert.unwrap_state_dict(state_dict, ("state_dict",)))
  fields = infer_config(sd)
  for key, value in config.items():
    if key in fields and tuple(np.atleast_1d(value)) != tuple(
        np.atleast_1d(fields[key])):
      raise convert.CheckpointMismatchError(
          f"{key}={value!r} was requested but the weights have "
          f"{key}={fields[key]!r}")
  fields.update(config)
  if dtype is not None:
    fields["dtype"] = dtype
  groups = fields.get("norm_num_groups", 32)
  bad = [c for c in fields["block_out_channels"] if c <= 0 or c % groups]
  if bad:
    raise convert.CheckpointMismatchError(
        f"block widths {fields['block_out_channels']} are not divisible by "
        f"norm_num_groups={groups}")
  return AutoencoderKL(**fields)


def _diffusers_config(directory: str) -> dict:
  """Fields from a diffusers config.json next to the weights, if any."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    cfg = json.load(f)
  cls = cfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise convert.CheckpointMismatchError(
        f"{path} describes a {cls}, expected an AutoencoderKL")
  out = {}
  if "norm_num_groups" in cfg:
    out["norm_num_groups"] = int(cfg["norm_num_groups"])
  if cfg.get("scaling_factor") is not None:
    out["scale_factor"] = float(cfg["scaling_factor"])
  return out


def load_diffusers_vae(path: str, dtype=None, scale_factor: float | None = None,
                       norm_num_groups: int | None = None
                       ) -> tuple[AutoencoderKL, dict]:
  """A diffusers VAE directory or weight file -> (module, params).

  A config.json beside the weights supplies norm_num_groups and the scale
  factor; the arguments, when given, take precedence.
  """
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in _WEIGHT_FILES
             if os.path.isfile(os.path.join(path, f))]
    if not files:
      raise FileNotFoundError(
          f"{path} holds neither a jdit VAE (vae_config.json) nor diffusers "
          f"weights ({' or '.join(_WEIGHT_FILES)})")
    directory, weights = path, files[0]
  else:
    directory, weights = os.path.dirname(os.path.abspath(path)), path
  config = _diffusers_config(directory)
  if scale_factor is not None:
    config["scale_factor"] = scale_factor
  if norm_num_groups is not None:
    config["norm_num_groups"] = norm_num_groups
  config.setdefault("scale_factor", SD_VAE_SCALE_FACTOR)
  sd = convert.load_state_dict(weights)
  model = vae_module_for(sd, dtype=dtype, **config)
  params = vae_params_from_torch(sd, **config)
  return model, params
