"""KL autoencoders in Flax: the Stable Diffusion VAE (f8, 4 latent channels)
and LightningDiT's VA-VAE (f16, 32 channels, attention at the lowest level).

Follows the architecture of diffusers' AutoencoderKL (Encoder, Decoder,
ResnetBlock2D, single-head mid-block attention, Downsample2D with asymmetric
(0, 1) padding, nearest-neighbour Upsample2D; optionally single-head attention
after each resnet of some levels, as AttnDownEncoderBlock2D and CompVis/LDM's
attn_resolutions) so that diffusers weights such as stabilityai/sd-vae-ft-ema
and CompVis/LDM first-stage weights such as VA-VAE's convert one-to-one
(`jdit.convert.vae_params_from_torch`). Channels-last throughout.

  model = AutoencoderKL()                      # SD-VAE defaults
  mean, logvar = model.apply({"params": p}, x, method="encode")
  x = model.apply({"params": p}, z, method="decode")   # z unscaled latents

`encode` takes images (B, H, W, 3) in [-1, 1]; `decode` takes unscaled latents
(B, h, w, 4) and returns (B, 8h, 8w, 3) images clipped to [-1, 1]. Diffusion
models work on latents multiplied by `scale_factor` (0.18215 for SD-VAE); the
factor lives in this module's config and in converted checkpoints, and
callers divide by it before `decode` (see `load_vae`). VA-VAE's diffusion
models instead see latents normalised per channel, (z - latents_mean) /
latents_std * scale_factor (LightningDiT's latent_norm with latent_multiplier
= scale_factor); `normalize_latents` / `denormalize_latents` apply whichever
the module's config describes, so callers need not know which VAE it is.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SD_VAE_SCALE_FACTOR = 0.18215
CONFIG_FILE = "vae_config.json"
PARAMS_FILE = "params.msgpack"


def _conv(features, kernel=3, stride=1, padding=1, dtype=jnp.float32,
          name=None):
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, dtype=dtype, name=name)


def _group_norm(groups, dtype, name):
  # diffusers uses eps 1e-6; two-pass variance as torch does.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype,
                      use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice, with a 1x1 shortcut when channels change."""
  features: int
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.features, dtype=self.dtype, name="conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.features, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, padding=0, dtype=self.dtype,
                name="conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all positions, with a residual."""
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm(self.groups, self.dtype, "group_norm")(x)
    y = y.reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y)
               for n in ("to_q", "to_k", "to_v"))
    # Explicit einsums rather than a fused kernel: one head of width c (512)
    # is outside what flash kernels accept; softmax statistics in float32.
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits * c ** -0.5, axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", probs, v)
    y = nn.Dense(c, dtype=self.dtype, name="to_out")(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int = 32
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """Images (B, H, W, C) -> (B, H/f, W/f, 2 * latent) moments (pre-quant)."""
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  groups: int = 32
  mid_block_attention: bool = True
  attention_levels: Sequence[int] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    chans = tuple(self.block_out_channels)
    x = _conv(chans[0], dtype=self.dtype, name="conv_in")(x)
    for i, ch in enumerate(chans):
      for j in range(self.layers_per_block):
        x = ResnetBlock(ch, self.groups, self.dtype,
                        name=f"down_blocks_{i}_resnets_{j}")(x)
        if i in self.attention_levels:
          x = AttentionBlock(self.groups, self.dtype,
                             name=f"down_blocks_{i}_attentions_{j}")(x)
      if i < len(chans) - 1:
        # diffusers' Downsample2D: pad right/bottom by one, 3x3 stride 2.
        x = _conv(ch, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                  name=f"down_blocks_{i}_downsample")(x)
    x = MidBlock(self.groups, self.mid_block_attention, self.dtype,
                 name="mid_block")(x)
    x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(2 * self.latent_channels, dtype=self.dtype,
                 name="conv_out")(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent) -> images (B, f*h, f*w, C), unclipped."""
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  groups: int = 32
  mid_block_attention: bool = True
  attention_levels: Sequence[int] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    chans = tuple(reversed(self.block_out_channels))
    x = _conv(chans[0], dtype=self.dtype, name="conv_in")(z)
    x = MidBlock(self.groups, self.mid_block_attention, self.dtype,
                 name="mid_block")(x)
    for i, ch in enumerate(chans):
      # up_blocks_i works at level len - 1 - i (the lowest resolution first).
      attention = len(chans) - 1 - i in self.attention_levels
      # Decoder blocks have one more resnet than encoder blocks (diffusers).
      for j in range(self.layers_per_block + 1):
        x = ResnetBlock(ch, self.groups, self.dtype,
                        name=f"up_blocks_{i}_resnets_{j}")(x)
        if attention:
          x = AttentionBlock(self.groups, self.dtype,
                             name=f"up_blocks_{i}_attentions_{j}")(x)
      if i < len(chans) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        x = _conv(ch, dtype=self.dtype, name=f"up_blocks_{i}_upsample")(x)
    x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(self.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers/LDM-compatible KL autoencoder; SD-VAE (f8, 4 ch) defaults.

  Attributes:
    in_channels / out_channels: image channels.
    latent_channels: channels of the latent (4 for SD-VAE).
    block_out_channels: per-resolution widths; len - 1 is log2 of the
      downsampling factor.
    layers_per_block: resnets per encoder block (decoder blocks have one
      more).
    norm_num_groups: GroupNorm groups.
    mid_block_attention: whether the mid blocks have self-attention.
    attention_levels: levels (indices into block_out_channels, 0 = full
      resolution) whose encoder and decoder blocks have self-attention after
      each resnet; LDM's attn_resolutions (VA-VAE: (4,), attention at 16px
      of a 256px image). Empty for SD-VAE.
    use_quant_conv / use_post_quant_conv: the 1x1 convs around the latent.
    scale_factor: multiply latents by this for diffusion models (0.18215 for
      SD-VAE, LightningDiT's latent_multiplier 1.0 for VA-VAE); not applied
      inside encode/decode.
    latents_mean / latents_std: per-channel statistics (latent_channels
      floats each) subtracted and divided before scale_factor; None for no
      per-channel normalisation (SD-VAE).
    dtype: compute dtype (params stay float32).
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scale_factor: float = SD_VAE_SCALE_FACTOR
  latents_mean: Sequence[float] | None = None
  latents_std: Sequence[float] | None = None
  attention_levels: Sequence[int] = ()
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Checked at construction, so a bad config or stats file fails when it is
    # loaded, not when the first batch is decoded.
    levels = len(self.block_out_channels)
    bad = [i for i in self.attention_levels if not 0 <= i < levels]
    if bad:
      raise ValueError(f"attention_levels {tuple(self.attention_levels)} must "
                       f"index the {levels} levels of block_out_channels")
    check_latent_stats(self.latents_mean, self.latents_std,
                       self.latent_channels)
    super().__post_init__()

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @nn.nowrap
  def normalize_latents(self, z):
    """VAE latents (B, h, w, C) -> what diffusion models see."""
    return normalize(z, self.scale_factor, self.latents_mean,
                     self.latents_std)

  @nn.nowrap
  def denormalize_latents(self, x):
    """Inverse of normalize_latents: diffusion-model latents -> VAE latents
    (what `decode` takes)."""
    z = x / self.scale_factor
    if self.latents_mean is not None:
      z = z * jnp.asarray(self.latents_std, jnp.float32) + jnp.asarray(
          self.latents_mean, jnp.float32)
    return z

  def setup(self):
    kw = dict(block_out_channels=tuple(self.block_out_channels),
              layers_per_block=self.layers_per_block,
              groups=self.norm_num_groups,
              mid_block_attention=self.mid_block_attention,
              attention_levels=tuple(self.attention_levels), dtype=self.dtype)
    self.encoder = Encoder(self.latent_channels, **kw)
    self.decoder = Decoder(self.out_channels, **kw)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, padding=0,
                              dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, padding=0,
                                   dtype=self.dtype)

  def encode(self, x):
    """Images (B, H, W, C) in [-1, 1] -> (mean, logvar), each (B, h, w, 4)."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"encode expects (B, H, W, {self.in_channels}) images,"
                       f" got {x.shape}")
    m = self.encoder(x.astype(self.dtype))
    if self.use_quant_conv:
      m = self.quant_conv(m)
    mean, logvar = jnp.split(m.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """Unscaled latents (B, h, w, 4) -> images (B, fh, fw, C) in [-1, 1]."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"decode expects unscaled latents (B, h, w, "
                       f"{self.latent_channels}), got {z.shape}")
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return jnp.clip(self.decoder(z).astype(jnp.float32), -1.0, 1.0)

  def decode_latents(self, x):
    """Diffusion-model latents (normalised, scaled) -> images in [-1, 1]."""
    return self.decode(self.denormalize_latents(x))

  def __call__(self, x, rng=None):
    """Reconstruction: decode(mean), or of a posterior sample given rng."""
    mean, logvar = self.encode(x)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self.decode(z)


def normalize(z, scale_factor: float, latents_mean=None, latents_std=None):
  """(z - latents_mean) / latents_std * scale_factor, the standardisation
  skipped when latents_mean is None; numpy or jax arrays (the latent
  dataset normalises on the host, the VAE module on the device)."""
  if latents_mean is not None:
    z = (z - np.asarray(latents_mean, np.float32)) / np.asarray(
        latents_std, np.float32)
  return z * float(scale_factor)


def check_latent_stats(mean, std, channels: int, what: str = "the VAE config"
                       ) -> None:
  """Raises ValueError unless mean/std are both None or both `channels`
  finite floats, std positive."""
  if mean is None and std is None:
    return
  if mean is None or std is None:
    raise ValueError(f"{what}: latents_mean and latents_std must be given "
                     f"together (got only "
                     f"{'latents_mean' if std is None else 'latents_std'})")
  for name, v in (("latents_mean", mean), ("latents_std", std)):
    v = np.asarray(v, np.float64)
    if v.shape != (channels,):
      raise ValueError(f"{what}: {name} has {v.size} values (shape "
                       f"{v.shape}), expected one per latent channel "
                       f"({channels},)")
    if not np.all(np.isfinite(v)):
      raise ValueError(f"{what}: {name} is not finite")
  if np.any(np.asarray(std) <= 0):
    raise ValueError(f"{what}: latents_std must be positive")


def config_of(model: AutoencoderKL) -> dict:
  """The JSON-able fields of a VAE module (what the vae CLI writes)."""
  out = {}
  for f in dataclasses.fields(model):
    if f.name in ("parent", "name", "dtype"):
      continue
    v = getattr(model, f.name)
    out[f.name] = list(v) if isinstance(v, (tuple, list)) else v
  return out


def save_vae(directory: str, model: AutoencoderKL, params) -> None:
  """Writes vae_config.json + params.msgpack into an existing directory."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config_of(model), f, indent=2)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  with open(os.path.join(directory, PARAMS_FILE), "wb") as f:
    f.write(serialization.msgpack_serialize(params))


def load_vae(path: str, dtype: Any = jnp.float32
             ) -> tuple[AutoencoderKL, dict, float]:
  """Loads a VAE: (module, params, scale_factor).

  Args:
    path: a directory written by `python -m jdit.convert vae`, a diffusers
      model directory (config.json + diffusion_pytorch_model.safetensors or
      .bin), or a single diffusers weight file (.safetensors/.bin/.pt; the
      architecture is read off the weights, the scale factor is SD-VAE's).
    dtype: compute dtype of the returned module.
  """
  from jdit import convert_vae  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(path)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)):
    from flax import serialization  # pylint: disable=g-import-not-at-top
    with open(os.path.join(path, CONFIG_FILE)) as f:
      cfg = json.load(f)
    params_path = os.path.join(path, PARAMS_FILE)
    if not os.path.isfile(params_path):
      raise FileNotFoundError(f"{path} has {CONFIG_FILE} but no "
                              f"{PARAMS_FILE}")
    with open(params_path, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    # JSON lists back to tuples: module fields must be hashable.
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    model = AutoencoderKL(**cfg, dtype=dtype)
    return model, params, model.scale_factor
  model, params = convert_vae.load_diffusers_vae(path, dtype=dtype)
  return model, params, model.scale_factor
