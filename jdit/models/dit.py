"""DiT: the isotropic diffusion transformer with adaLN-Zero blocks.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023). Layer
names and initialisation follow facebookresearch/DiT so that its checkpoints
convert exactly. The token mixer is chosen by name from the mixer registry,
so every attention variant shares these blocks, embeddings and final layer.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.models import mixers
from jdit.models.embed import (EXTRAPOLATIONS, LabelEmbedder, PatchEmbed,
                               TimestepEmbedder, dense, sincos_2d)
from jdit.models.feedforward import get_feedforward
from jdit.models.registry import register_model

REMAT_POLICIES = ("none", "full", "dots_saveable", "offload")

# Logical names of activation axes (mapped to mesh axes by config rules).
ACT = ("act_batch", "act_length", "act_embed")


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


NORMS = ("layer", "rms")


def block_norm(kind: str, name: str) -> nn.Module:
  """The pre-norm of a block or of the final layer, statistics in float32.

  "layer": LayerNorm without affine parameters (adaLN supplies scale and
  shift), as DiT. "rms": RMSNorm with a learned scale, as LightningDiT.
  """
  if kind == "layer":
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False,
                        dtype=jnp.float32, name=name)
  return nn.RMSNorm(epsilon=1e-6, dtype=jnp.float32, name=name,
                    scale_init=nn.with_logical_partitioning(
                        nn.initializers.ones_init(), ("embed",)))


def adaln_modulation(c, n, *, dtype, param_dtype):
  """SiLU -> zero-initialised Dense(n * D): the adaLN-Zero parameters."""
  d = c.shape[-1]
  out = dense(n * d, ("embed", "mlp"), kernel_init=nn.initializers.zeros_init(),
              dtype=dtype, param_dtype=param_dtype,
              name="adaLN_modulation")(nn.silu(c))
  return jnp.split(out, n, axis=-1)


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block around a registered token mixer."""
  # Returns x + update (jdit.models.block_hooks: caching, pruning, KD).
  residual_block = True
  num_heads: int
  mlp_ratio: float = 4.0
  mixer: str = "attention"
  mixer_options: Any = None
  mlp: str = "dense"
  mlp_options: Any = None
  norm: str = "layer"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, grid_shape, deterministic=True, t=None):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        adaln_modulation(c, 6, dtype=self.dtype, param_dtype=self.param_dtype))
    mixer = mixers.get_mixer(self.mixer)(
        num_heads=self.num_heads, dtype=self.dtype,
        param_dtype=self.param_dtype, **dict(self.mixer_options or {}),
        name="attn")
    h = modulate(block_norm(self.norm, "norm1")(x), shift_msa, scale_msa)
    h = mixer(h.astype(self.dtype), grid_shape=grid_shape,
              deterministic=deterministic)
    x = x + gate_msa[:, None] * h
    h = modulate(block_norm(self.norm, "norm2")(x), shift_mlp, scale_mlp)
    ff = get_feedforward(self.mlp)
    # Feed-forwards that route by timestep (MoE's diffusion prior) get t.
    extra = {"t": t} if getattr(ff, "uses_timesteps", False) else {}
    h = ff(hidden=int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype,
           param_dtype=self.param_dtype, **dict(self.mlp_options or {}),
           name="mlp")(h.astype(self.dtype), c, deterministic, **extra)
    x = x + gate_mlp[:, None] * h
    return nn.with_logical_constraint(x, ACT)


class FinalLayer(nn.Module):
  """adaLN, then a zero-initialised projection to patch pixels."""
  patch_size: int
  out_channels: int
  norm: str = "layer"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    shift, scale = adaln_modulation(c, 2, dtype=self.dtype,
                                    param_dtype=self.param_dtype)
    x = modulate(block_norm(self.norm, "norm_final")(x), shift, scale)
    p = self.patch_size
    return dense(p * p * self.out_channels, ("embed", None),
                 kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="linear")(
                     x.astype(self.dtype))


def remat_block(cls, policy: str):
  """Wraps a block class for rematerialisation under a named policy."""
  if policy == "none":
    return cls
  policies = {
      "full": None,  # save nothing, recompute the whole block
      "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
          "device", "pinned_host"),
  }
  return nn.remat(cls, policy=policies[policy], static_argnums=(3, 4))


def grid_of(input_size, patch_size) -> tuple[int, int]:
  h, w = ((input_size, input_size) if isinstance(input_size, int)
          else tuple(input_size))
  if h % patch_size or w % patch_size:
    raise ValueError(f"input_size {input_size} must be divisible by "
                     f"patch_size {patch_size}")
  return h // patch_size, w // patch_size


class ImageBackbone:
  """What the trainer, samplers and converters rely on in a backbone.

  Mixed into DiT-family modules that have the fields input_size,
  patch_size, in_channels, num_classes, learn_sigma, class_dropout_prob and
  remat.
  """

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)

  @property
  def grid_shape(self) -> tuple[int, int]:
    return grid_of(self.input_size, self.patch_size)

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one input image (or latent)."""
    gh, gw = self.grid_shape
    return (gh * self.patch_size, gw * self.patch_size, self.in_channels)

  def check_common(self) -> None:
    """Validates the fields every backbone shares."""
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got "
                       f"{self.remat!r}")
    if not 0 <= self.class_dropout_prob < 1:
      raise ValueError(f"class_dropout_prob must be in [0, 1), got "
                       f"{self.class_dropout_prob}")

  def check_input(self, x) -> None:
    if x.shape[1:] != self.input_shape:
      h, w, c = self.input_shape
      raise ValueError(f"x must have shape (B, {h}, {w}, {c}), got {x.shape}")


class RepaProjector(nn.Module):
  """REPA's projector: Dense-SiLU-Dense-SiLU-Dense from the DiT width to the
  target encoder's, applied per token (Yu et al. 2024, `build_mlp`)."""
  hidden: int
  out: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)  # a small head; its loss is a cosine
    for i, width in enumerate((self.hidden, self.hidden)):
      x = nn.silu(nn.Dense(width, param_dtype=self.param_dtype,
                           name=f"fc{i + 1}")(x))
    return nn.Dense(self.out, param_dtype=self.param_dtype, name="fc3")(x)


def embed_condition(model, width, t, y, train, force_drop_ids):
  """Timestep + label embedding, (B, width); call from a compact __call__."""
  kw = dict(dtype=model.dtype, param_dtype=model.param_dtype)
  c = TimestepEmbedder(width, name="t_embedder", **kw)(t)
  return c + LabelEmbedder(model.num_classes, width, model.class_dropout_prob,
                           param_dtype=model.param_dtype, name="y_embedder")(
                               y, train, force_drop_ids).astype(model.dtype)


class DiT(ImageBackbone, nn.Module):
  """Class-conditional diffusion transformer on channels-last inputs.

  Call: model.apply({"params": p}, x, t, y, train=False, rngs=...) with x
  (B, H, W, C), t (B,) float timesteps, y (B,) int labels (num_classes is the
  null label). Returns (B, H, W, C_out), C_out = 2C with learned sigma, in
  float32. With train=True, labels are dropped with class_dropout_prob using
  the "dropout" RNG stream, or where force_drop_ids (B,) bool is True.
  """
  depth: int
  hidden_size: int
  num_heads: int
  patch_size: int = 2
  input_size: int | Sequence[int] = 32
  in_channels: int = 4
  num_classes: int = 1000
  learn_sigma: bool = True
  class_dropout_prob: float = 0.1
  mlp_ratio: float = 4.0
  mixer: str = "attention"
  mixer_options: Any = None
  # Blocks (0-based) that use `mixer`; the others use dense attention.
  # None: every block. PixArt-Sigma compresses keys and values in blocks
  # 14-27 of 28 only.
  mixer_layers: Sequence[int] | None = None
  mlp: str = "dense"  # a registered feed-forward (jdit/models/feedforward.py)
  mlp_options: Any = None
  norm: str = "layer"  # "layer" (DiT) or "rms" (LightningDiT), see block_norm
  # REPA (jdit/repa.py): {"depth": k, "dim": encoder width, "projector_dim":
  # h}; in training the tokens after block k are projected and sown as
  # intermediates "repa". None: no projector.
  repa: Any = None
  # Running on a grid other than the trained one (sampling at another
  # resolution): the trained token grid (rows, cols) and how positions
  # extend past it, one of embed.EXTRAPOLATIONS; applies to the sin-cos
  # embedding and to rotary attention. None: positions as in training.
  base_grid: Sequence[int] | None = None
  extrapolation: str = "extrapolate"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  def validate(self):
    """Checks hyperparameters at construction (build_model calls this)."""
    self.grid_shape  # pylint: disable=pointless-statement
    for field in ("depth", "hidden_size", "num_heads", "patch_size",
                  "in_channels", "num_classes"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} must be divisible by "
                       f"num_heads {self.num_heads}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.extrapolation not in EXTRAPOLATIONS:
      raise ValueError(f"extrapolation must be one of {EXTRAPOLATIONS}, got "
                       f"{self.extrapolation!r}")
    if self.base_grid is not None and (
        len(tuple(self.base_grid)) != 2 or min(self.base_grid) < 1):
      raise ValueError(f"base_grid must be the trained (rows, cols) token "
                       f"grid or None, got {self.base_grid!r}")
    if self.mixer_layers is not None:
      layers = list(self.mixer_layers)
      if (not layers or len(set(layers)) != len(layers)
          or not all(isinstance(i, int) and 0 <= i < self.depth
                     for i in layers)):
        raise ValueError(f"mixer_layers must be distinct block indices in "
                         f"[0, depth={self.depth}), or None for every "
                         f"block; got {self.mixer_layers!r}")
    try:  # an unbound instance checks the options (MoE validates its own)
      self.feedforward()
    except TypeError as e:
      raise ValueError(f"bad mlp_options {dict(self.mlp_options or {})} for "
                       f"mlp {self.mlp!r}: {e}") from e
    if self.repa is not None:
      r = dict(self.repa)
      if set(r) != {"depth", "dim", "projector_dim"} or not (
          1 <= r["depth"] <= self.depth):
        raise ValueError(f"repa must be {{'depth': 1..{self.depth}, 'dim', "
                         f"'projector_dim'}} or None, got {self.repa!r}")
    self.check_common()

  def feedforward(self) -> nn.Module:
    """The blocks' feed-forward layer, unbound: its options, defaults filled."""
    return get_feedforward(self.mlp)(
        hidden=int(self.hidden_size * self.mlp_ratio), parent=None,
        **dict(self.mlp_options or {}))

  def block_mixer(self, i: int):
    """(mixer name, mixer options) of block i."""
    if self.mixer_layers is None or i in self.mixer_layers:
      mixer, options = self.mixer, self.mixer_options
    else:
      mixer, options = "attention", None
    if self.base_grid is not None and dict(options or {}).get("rope"):
      options = {**dict(options), "rope_base_grid": tuple(self.base_grid),
                 "rope_extrapolation": self.extrapolation}
    return mixer, options

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, force_drop_ids=None):
    self.check_input(x)
    gh, gw = self.grid_shape
    p = self.patch_size
    b = x.shape[0]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = PatchEmbed(self.hidden_size, p, name="x_embedder", **kw)(
        x.astype(self.dtype))
    base = None if self.base_grid is None else tuple(self.base_grid)
    x = x + sincos_2d(self.hidden_size, gh, gw, base, self.extrapolation)[
        None].astype(self.dtype)
    x = nn.with_logical_constraint(x, ACT)
    c = embed_condition(self, self.hidden_size, t, y, train, force_drop_ids)
    block = remat_block(DiTBlock, self.remat)
    for i in range(self.depth):
      mixer, options = self.block_mixer(i)
      x = block(self.num_heads, self.mlp_ratio, mixer, options, self.mlp,
                self.mlp_options, self.norm, name=f"blocks_{i}", **kw)(
                    x, c, (gh, gw), not train, t)
      if self.repa and i + 1 == self.repa["depth"] and (
          train or self.is_initializing()):  # sampling skips the head
        self.sow("intermediates", "repa", RepaProjector(
            self.repa["projector_dim"], self.repa["dim"],
            param_dtype=self.param_dtype, name="repa_projector")(x))
    x = FinalLayer(p, self.out_channels, self.norm, name="final_layer",
                   **kw)(x, c)
    # Unpatchify: (B, L, p*p*C) -> (B, H, W, C); pixel order (p, q, c).
    x = x.reshape(b, gh, gw, p, p, self.out_channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * p, gw * p,
                                              self.out_channels)
    return x.astype(jnp.float32)


# The DiT paper's Table 1: (depth, hidden size, heads) per size.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
             "XL": (28, 1152, 16)}

# Smoke size of every DiT-backbone model (registry.smoke_overrides): one
# block of width 32, a few MFLOPs per image.
DIT_SMOKE = {"depth": 1, "hidden_size": 32, "num_heads": 2}

for _size, (_depth, _width, _heads) in DIT_SIZES.items():
  for _patch in (2, 4, 8):
    register_model(f"DiT-{_size}/{_patch}", DiT, depth=_depth,
                   hidden_size=_width, num_heads=_heads, patch_size=_patch,
                   smoke=DIT_SMOKE)
