"""REPA: align DiT hidden states with a frozen self-supervised encoder.

Yu et al., "Representation Alignment for Generation: Training Diffusion
Transformers Is Easier Than You Think" (ICLR 2025). In training, the tokens
after block `depth` (REPA: 8 of SiT-XL/2's 28) go through a small MLP
projector (jdit.models.dit.RepaProjector) and are pulled, per token, towards
the patch features of a frozen DINOv2 (jdit.dinov2) of the clean image: the
term weight * mean(1 - cos) (REPA: weight 0.5, its -cos plus a constant) is
added to the diffusion loss and logged as "repa_loss". The encoder sees the
image at (DiT token grid x 14) pixels, so its patch grid is the DiT's token
grid: 224px for 256 tokens, REPA's choice at 256px. Sampling never runs the
projector, and a REPA checkpoint samples like any other.

Images: a pixel-space model's input is the image; a latent model needs the
images stored beside the latents (`python -m jdit.data.extract_latents
--store_images`), which the input pipeline then passes along.

    python train.py --config configs/sit_imagenet256.py ... \\
        --config.repa.weight=0.5 \\
        --config.repa.encoder=/ckpt/dinov2_vitb14_pretrain.pth
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from jdit import train_state
from jdit.diffusion.flow import cosine_similarity

KEYS = ("weight", "encoder", "dim", "depth", "projector_dim")
TOKEN_PATCH = 14  # DINOv2's patch size


def default_config() -> ml_collections.ConfigDict:
  """The config.repa section (off: weight 0)."""
  return ml_collections.ConfigDict({
      "weight": 0.0,        # lambda; REPA: 0.5
      "encoder": "",        # DINOv2 weights, e.g. dinov2_vitb14_pretrain.pth
      "dim": 768,           # the encoder's width (ViT-B/14: 768)
      "depth": 8,           # align the tokens after this many blocks
      "projector_dim": 2048,
  })


def enabled(config: ml_collections.ConfigDict) -> bool:
  r = config.get("repa")
  return bool(r and r.get("weight"))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks config.repa when enabled, naming the bad key."""
  if not enabled(config):
    return
  r = config.repa
  unknown = sorted(set(r.keys()) - set(KEYS))
  if unknown:
    raise ValueError(f"unknown config.repa keys {unknown}; allowed: {KEYS}")
  if r.weight < 0:
    raise ValueError(f"config.repa.weight must be >= 0, got {r.weight}")
  for key in ("dim", "depth", "projector_dim"):
    if not isinstance(r.get(key), int) or r[key] < 1:
      raise ValueError(f"config.repa.{key} must be a positive integer, got "
                       f"{r.get(key)!r}")
  if not r.get("encoder"):
    raise ValueError("config.repa.weight > 0 needs config.repa.encoder: the "
                     "DINOv2 weights (e.g. dinov2_vitb14_pretrain.pth)")


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """The build_model override that gives the model REPA's projector."""
  if not enabled(config):
    return {}
  r = config.repa
  return {"repa": {"depth": int(r.depth), "dim": int(r.dim),
                   "projector_dim": int(r.projector_dim)}}


def needs_stored_images(channels: int) -> bool:
  """Whether a model of `channels` input channels (a latent model) needs the
  images stored with its data; a pixel model's input is the image."""
  return channels not in (1, 3)


def load_encoder(config: ml_collections.ConfigDict, model):
  """(encoder, params) of config.repa.encoder, checked against the model."""
  from jdit import convert_dinov2  # pylint: disable=g-import-not-at-top
  if getattr(model, "repa", None) is None:
    raise ValueError(f"config.repa needs a DiT-family model (with blocks to "
                     f"project from); {type(model).__name__} has none")
  try:
    encoder, params = convert_dinov2.load_dinov2(config.repa.encoder)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"config.repa.encoder={config.repa.encoder!r} is not "
                     f"DINOv2 weights: {e}") from e
  if encoder.hidden_size != config.repa.dim:
    raise ValueError(f"config.repa.dim={config.repa.dim} but the encoder "
                     f"{config.repa.encoder!r} is {encoder.hidden_size} wide")
  return encoder, params


def make_target_fn(encoder, model):
  """(encoder params, x, images) -> (B, tokens, dim) encoder features.

  `images`: uint8-range (B, H, W, C) or None for a pixel-space model, whose
  input x in [-1, 1] is the image.
  """
  from jdit import dinov2  # pylint: disable=g-import-not-at-top
  gh, gw = model.grid_shape  # one encoder patch per DiT token
  size = (gh * TOKEN_PATCH, gw * TOKEN_PATCH)

  def target_fn(params, x, images):
    if images is None:
      if needs_stored_images(x.shape[-1]):
        raise ValueError(
            f"REPA on a latent model ({x.shape[-1]} channels) needs the "
            f"images: extract the latents with --store_images")
      images = (x.astype(jnp.float32) + 1.0) * 127.5
    images = images.astype(jnp.float32)
    if images.shape[-1] == 1:  # grayscale: DINOv2 wants RGB
      images = jnp.repeat(images, 3, axis=-1)
    return encoder.apply({"params": params},
                         dinov2.preprocess(images, size))["patch"]

  return target_fn


def cosine_distance(z, target):
  """mean over tokens and batch of 1 - cos(z, target), in float32."""
  return jnp.mean(1.0 - cosine_similarity(z.astype(jnp.float32),
                                          target.astype(jnp.float32)))


def make_apply_fn(model, weight: float):
  """The train step's network call with REPA's term (and MoE aux losses)."""

  def apply_fn(params, frozen, x_t, t, y, drop, targets):
    del frozen
    out, state = model.apply({"params": params}, x_t, t, y, train=True,
                             force_drop_ids=drop,
                             mutable=["aux_loss", "intermediates"])
    (z,) = state["intermediates"]["repa"]
    return out, {"repa_loss": weight * cosine_distance(z, targets),
                 **train_state.aux_loss_terms(state)}

  return apply_fn
