"""PyTorch AutoencoderKL weights -> Flax params for jdit.vae.AutoencoderKL.

Reads the diffusers layout of stabilityai/sd-vae-ft-ema and -mse (and any
AutoencoderKL of the same family: widths, depth, latent channels and levels
with attention are read off the weights), and the CompVis/LDM layout of
VA-VAE and of SD's first stage (jdit.convert_ldm_vae names those keys).
diffusers attention weights may use the older names (query/key/value/
proj_attn, from checkpoints saved before diffusers 0.14) or the newer ones
(to_q/to_k/to_v/to_out.0), as Linear (C, C) or 1x1-conv (C, C, 1, 1) tensors.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from jdit import convert, convert_ldm_vae
from jdit.vae import SD_VAE_SCALE_FACTOR, AutoencoderKL, check_latent_stats

# Old diffusers attention names -> new ones.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                  "proj_attn": "to_out.0"}


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


def prepared_weights(state_dict: Mapping[str, Any]
                     ) -> tuple[dict[str, Any], bool]:
  """(weights ready for the layout, whether they use LDM's names)."""
  sd = convert.unwrap_state_dict(state_dict, ("state_dict",))
  if convert_ldm_vae.is_ldm(sd):
    return convert_ldm_vae.autoencoder_weights(sd), True
  return normalize_keys(sd), False


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
  if convert_ldm_vae.is_ldm(sd):
    return _complete_config(sd, "LDM", **convert_ldm_vae.read_structure(sd))
  if not all(k in sd for k in needed):
    raise convert.CheckpointMismatchError(
        f"not a diffusers AutoencoderKL state dict (nor a CompVis/LDM one): "
        f"missing {[k for k in needed if k not in sd]}; first keys: "
        f"{', '.join(sorted(sd)[:8])}")
  blocks = _count(sd, "encoder.down_blocks")
  if blocks == 0:
    raise convert.CheckpointMismatchError(
        "not a diffusers AutoencoderKL state dict: no encoder.down_blocks")
  chans = tuple(int(np.shape(sd[f"encoder.down_blocks.{i}.resnets.0.conv1."
                                 f"weight"])[0])
                if f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in sd
                else -1 for i in range(blocks))
  # AttnDownEncoderBlock2D / AttnUpDecoderBlock2D; up block k is at level
  # blocks - 1 - k.
  enc_attn = tuple(i for i in range(blocks)
                   if _count(sd, f"encoder.down_blocks.{i}.attentions"))
  dec_attn = tuple(sorted(blocks - 1 - k for k in range(blocks)
                          if _count(sd, f"decoder.up_blocks.{k}.attentions")))
  return _complete_config(
      sd, "diffusers", block_out_channels=chans,
      layers_per_block=_count(sd, "encoder.down_blocks.0.resnets"),
      mid_block_attention=any(".mid_block.attentions.0." in k for k in sd),
      encoder_attention=enc_attn, decoder_attention=dec_attn)


def _complete_config(sd, layout: str, *, encoder_attention,
                     decoder_attention, **fields) -> dict:
  """The fields both layouts name alike, added to the layout's own."""
  if encoder_attention != decoder_attention:
    raise convert.CheckpointMismatchError(
        f"{layout} encoder has attention at levels {encoder_attention} but "
        f"the decoder at {decoder_attention}; jdit's AutoencoderKL needs the "
        f"same levels")
  return dict(
      in_channels=int(np.shape(sd["encoder.conv_in.weight"])[1]),
      out_channels=int(np.shape(sd["decoder.conv_out.weight"])[0]),
      latent_channels=int(np.shape(sd["decoder.conv_in.weight"])[1]),
      attention_levels=encoder_attention,
      use_quant_conv="quant_conv.weight" in sd,
      use_post_quant_conv="post_quant_conv.weight" in sd, **fields)


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

  def attention(tkey, fpath, c):
    norm(f"{tkey}.group_norm", fpath + ("group_norm",), c)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
      fname = name.split(".")[0]
      out[f"{tkey}.{name}.weight"] = ((c, c), "linear",
                                      fpath + (fname, "kernel"))
      out[f"{tkey}.{name}.bias"] = ((c,), "id", fpath + (fname, "bias"))

  def mid(tkey, fpath, c):
    resnet(f"{tkey}.resnets.0", fpath + ("resnets_0",), c, c)
    resnet(f"{tkey}.resnets.1", fpath + ("resnets_1",), c, c)
    if model.mid_block_attention:
      attention(f"{tkey}.attentions.0", fpath + ("attentions_0",), c)

  chans = tuple(model.block_out_channels)
  lat = model.latent_channels
  enc, dec = ("encoder",), ("decoder",)
  conv("encoder.conv_in", enc + ("conv_in",), chans[0], model.in_channels)
  cin = chans[0]
  for i, ch in enumerate(chans):
    for j in range(model.layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}",
             enc + (f"down_blocks_{i}_resnets_{j}",), cin, ch)
      if i in model.attention_levels:
        attention(f"encoder.down_blocks.{i}.attentions.{j}",
                  enc + (f"down_blocks_{i}_attentions_{j}",), ch)
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
      if len(rchans) - 1 - i in model.attention_levels:
        attention(f"decoder.up_blocks.{i}.attentions.{j}",
                  dec + (f"up_blocks_{i}_attentions_{j}",), ch)
      cin = ch
    if i < len(rchans) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv",
           dec + (f"up_blocks_{i}_upsample",), ch, ch)
  norm("decoder.conv_norm_out", dec + ("conv_norm_out",), rchans[-1])
  conv("decoder.conv_out", dec + ("conv_out",), model.out_channels,
       rchans[-1])
  return out


def vae_params_from_torch(state_dict: Mapping[str, Any], **config) -> dict:
  """Converts diffusers or CompVis/LDM AutoencoderKL weights to jdit params.

  Args:
    state_dict: diffusers-format weights (torch tensors or numpy arrays),
      e.g. sd-vae-ft-ema's diffusion_pytorch_model.safetensors, or LDM-format
      ones (VA-VAE's checkpoint, an SD checkpoint's first_stage_model.*),
      bare or under "state_dict".
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
  sd, ldm = prepared_weights(state_dict)
  layout = _layout(model)
  if ldm:
    levels = len(model.block_out_channels)
    layout = {convert_ldm_vae.ldm_key(k, levels): v
              for k, v in layout.items()}
  convert.check_keys(sd, {k: v[0] for k, v in layout.items()},
                     f"{'CompVis/LDM' if ldm else 'diffusers'} AutoencoderKL "
                     f"{convert_config(model)}")
  params: dict = {}
  for key, (_, kind, path) in layout.items():
    convert.set_path(params, path, convert.torch_to_flax(sd[key], kind))
  return params


def convert_config(model: AutoencoderKL) -> dict:
  return {k: getattr(model, k) for k in (
      "latent_channels", "block_out_channels", "layers_per_block",
      "norm_num_groups", "attention_levels")}


def vae_module_for(state_dict: Mapping[str, Any], dtype=None, **config
                   ) -> AutoencoderKL:
  """The AutoencoderKL whose architecture the weights describe."""
  fields = infer_config(prepared_weights(state_dict)[0])
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
  # diffusers normalises as we do: (z - latents_mean) * scale / latents_std.
  if cfg.get("latents_mean") is not None:
    out["latents_mean"] = tuple(float(v) for v in cfg["latents_mean"])
    out["latents_std"] = tuple(float(v) for v in cfg.get("latents_std") or ())
  return out


def read_latent_stats(path: str, channels: int | None = None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(latents_mean, latents_std) from a stats file such as LightningDiT's
  latents_stats.pt: {"mean": (1, C, 1, 1), "std": (1, C, 1, 1)} (any shape
  with C values). With `channels`, checks that C is that."""
  stats = convert.load_state_dict(path)
  if not isinstance(stats, Mapping) or not {"mean", "std"} <= set(stats):
    found = sorted(stats) if isinstance(stats, Mapping) else type(stats)
    raise ValueError(f"latent stats file {path} must hold 'mean' and 'std' "
                     f"(per-channel, as LightningDiT's latents_stats.pt); it "
                     f"has {found}")
  mean, std = (tuple(float(v) for v in convert.to_numpy(stats[k]).ravel())
               for k in ("mean", "std"))
  if channels is not None:
    check_latent_stats(mean, std, channels,
                       f"latent stats file {path} (for a VAE with "
                       f"{channels} latent channels)")
  return mean, std


def load_diffusers_vae(path: str, dtype=None, scale_factor: float | None = None,
                       norm_num_groups: int | None = None,
                       latent_stats: str | None = None
                       ) -> tuple[AutoencoderKL, dict]:
  """A diffusers VAE directory or weight file, or a CompVis/LDM checkpoint
  (VA-VAE, SD) -> (module, params).

  A diffusers config.json beside diffusers weights supplies norm_num_groups,
  the scale factor and per-channel latent statistics; the arguments, when
  given, take precedence. `latent_stats` is a file for `read_latent_stats`;
  with it the scale factor defaults to 1.0 (LightningDiT's
  latent_multiplier), without it to SD-VAE's 0.18215.
  """
  try:
    directory, weights = convert.diffusers_weights(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{os.path.expanduser(path)} holds neither a jdit VAE "
        f"(vae_config.json) nor diffusers weights "
        f"({' or '.join(convert.DIFFUSERS_WEIGHT_FILES)})") from e
  sd = convert.load_state_dict(weights)
  # A config.json beside an LDM checkpoint is not a diffusers VAE's.
  ldm = convert_ldm_vae.is_ldm(convert.unwrap_state_dict(sd, ("state_dict",)))
  config = {} if ldm else _diffusers_config(directory)
  if scale_factor is not None:
    config["scale_factor"] = scale_factor
  if norm_num_groups is not None:
    config["norm_num_groups"] = norm_num_groups
  if latent_stats is not None:
    channels = vae_module_for(sd, **config).latent_channels
    config["latents_mean"], config["latents_std"] = read_latent_stats(
        latent_stats, channels)
  config.setdefault("scale_factor", 1.0 if "latents_mean" in config
                    else SD_VAE_SCALE_FACTOR)
  model = vae_module_for(sd, dtype=dtype, **config)
  params = vae_params_from_torch(sd, **config)
  return model, params
