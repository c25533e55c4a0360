"""The CompVis/LDM AutoencoderKL layout (VA-VAE, SD's first stage) for
jdit.convert_vae.

LDM's taming-style Encoder/Decoder is the same network as diffusers'
AutoencoderKL under other names: `encoder.down.{i}.block.{j}` for
`encoder.down_blocks.{i}.resnets.{j}`, `attn` (1x1-conv q/k/v/proj_out) for
`attentions`, `mid.block_1/attn_1/block_2`, `norm_out`, `nin_shortcut`. The
one structural difference is that LDM numbers the decoder's up blocks by
level (`decoder.up.{i}` works at resolution / 2**i), where diffusers numbers
them in the order they run (lowest resolution first). `ldm_key` maps
convert_vae's diffusers-named layout to these names, so that errors name the
keys the checkpoint actually has.

Checkpoints: VA-VAE's vavae-imagenet256-f16d32-dinov2.pt ({"state_dict":
encoder/decoder/quant convs, plus loss.* and foundation-model weights that
are not part of the autoencoder), LDM first-stage checkpoints, and full
Stable Diffusion checkpoints (the VAE under `first_stage_model.`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jdit import convert

# The autoencoder's top-level modules; a training checkpoint's other weights
# (loss.*: LPIPS and discriminator; VA-VAE's vision-foundation projection)
# do not belong to it.
AUTOENCODER_MODULES = ("encoder", "decoder", "quant_conv", "post_quant_conv")
# Where full latent-diffusion checkpoints keep their first stage.
FIRST_STAGE_PREFIX = "first_stage_model."
_NEEDED = ("encoder.conv_in.weight", "decoder.conv_in.weight",
           "decoder.conv_out.weight", "encoder.down.0.block.0.conv1.weight")


def is_ldm(state_dict: Mapping[str, Any]) -> bool:
  """Whether the keys are LDM's (encoder.down.*, or an SD first stage)."""
  return any(k.startswith(("encoder.down.", "decoder.up.",
                           FIRST_STAGE_PREFIX)) for k in state_dict)


def autoencoder_weights(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The autoencoder's weights of an LDM checkpoint, attention 1x1 convs as
  (C, C) matrices (diffusers' Linear layout, which convert_vae expects)."""
  sd = dict(state_dict)
  if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd):
    sd = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in sd.items()
          if k.startswith(FIRST_STAGE_PREFIX)}
  out = {}
  for key, value in sd.items():
    if key.split(".")[0] not in AUTOENCODER_MODULES:
      continue
    if (re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", key)
        and np.shape(value)[2:] == (1, 1)):
      value = convert.to_numpy(value)[:, :, 0, 0]
    out[key] = value
  return out


def _levels(sd, prefix):
  """Sorted i of the `{prefix}.{i}.` keys."""
  return sorted({int(m.group(1)) for k in sd
                 for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", k)]
                 if m})


def read_structure(sd: Mapping[str, Any]) -> dict:
  """The layout-specific AutoencoderKL fields read off LDM weights, and the
  levels with attention in the encoder and the decoder
  (convert_vae.infer_config completes and checks them)."""
  missing = [k for k in _NEEDED if k not in sd]
  if missing:
    raise convert.CheckpointMismatchError(
        f"not a CompVis/LDM AutoencoderKL state dict: missing {missing}; "
        f"first keys: {', '.join(sorted(sd)[:8])}")
  levels = _levels(sd, "encoder.down")
  if levels != list(range(len(levels))):
    raise convert.CheckpointMismatchError(
        f"LDM encoder levels {levels} are not numbered 0..n-1")
  chans = tuple(int(np.shape(sd[f"encoder.down.{i}.block.0.conv1.weight"])[0])
                if f"encoder.down.{i}.block.0.conv1.weight" in sd else -1
                for i in levels)
  enc_attn = tuple(i for i in levels if _levels(sd, f"encoder.down.{i}.attn"))
  dec_attn = tuple(i for i in _levels(sd, "decoder.up")
                   if _levels(sd, f"decoder.up.{i}.attn"))
  return dict(
      block_out_channels=chans,
      layers_per_block=len(_levels(sd, "encoder.down.0.block")),
      mid_block_attention=any(k.startswith("encoder.mid.attn_1.") for k in sd),
      encoder_attention=enc_attn, decoder_attention=dec_attn)


# diffusers name -> LDM name, applied in order after the block prefixes.
_RENAMES = (
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.resnets\.", ".block."),
    (r"\.attentions\.", ".attn."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.to_out\.0\.", ".proj_out."),
)


def ldm_key(key: str, levels: int) -> str:
  """convert_vae's (diffusers) key -> the LDM key of the same weight, for an
  autoencoder of `levels` resolutions."""
  key = re.sub(r"^encoder\.down_blocks\.", "encoder.down.", key)
  key = re.sub(r"^decoder\.up_blocks\.(\d+)\.",
               lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", key)
  for pattern, repl in _RENAMES:
    key = re.sub(pattern, repl, key)
  return key
