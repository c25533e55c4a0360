"""Input embeddings of the DiT family: patches, timesteps, labels, positions.

Parameter names and initialisers follow facebookresearch/DiT so that official
checkpoints convert one-to-one (see jdit/convert.py).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype


def dense(features, logical_axes, *, kernel_init=nn.initializers.xavier_uniform(),
          dtype=jnp.float32, param_dtype=jnp.float32, name=None, use_bias=True):
  """A Dense layer whose kernel carries logical axis names for sharding."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, logical_axes),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), logical_axes[-1:]),
      name=name)


# How positions extend past the token grid a model was trained on, when it
# runs on a larger one (frequencies 2i/d of a d-channel part, scale s =
# new length / trained length along an axis, per axis):
#   "extrapolate": nothing changes (new positions, unseen phases);
#   "interpolate": positions times 1/s (PI: the trained range, finer steps);
#   "ntk": base theta times s^(d / (d - 2)) (NTK-aware: high frequencies
#     kept, the lowest one interpolated);
#   "yarn": per frequency, interpolated when its wavelength exceeds the
#     trained length, kept when it is 32 or more times shorter, blended in
#     between; rotary tables also scale attention logits by
#     (0.1 ln s_tokens + 1)^2, s_tokens the ratio of token counts (YaRN).
# A grid no larger than the trained one is never rescaled.
EXTRAPOLATIONS = ("extrapolate", "interpolate", "ntk", "yarn")
YARN_RAMP = (1.0, 32.0)  # YaRN's alpha, beta (wavelength ratios)


def _axis_scales(grid_shape, base_grid) -> np.ndarray:
  if base_grid is None:
    return np.ones(len(grid_shape))
  if len(base_grid) != len(grid_shape) or min(base_grid) < 1:
    raise ValueError(f"base_grid must give the trained length of each of the "
                     f"{len(grid_shape)} grid axes, got {base_grid!r}")
  return np.maximum(np.asarray(grid_shape, np.float64)
                    / np.asarray(base_grid, np.float64), 1.0)


def scaled_frequencies(d: int, theta: float, scale: float, base_len: float,
                       method: str) -> np.ndarray:
  """The d/2 angular frequencies theta^(-2i/d), adapted to a grid `scale`
  times longer than the trained `base_len` (EXTRAPOLATIONS)."""
  if method not in EXTRAPOLATIONS:
    raise ValueError(f"extrapolation must be one of {EXTRAPOLATIONS}, got "
                     f"{method!r}")
  exponents = np.arange(0, d, 2, dtype=np.float64) / d
  if scale > 1 and method == "ntk" and d > 2:
    theta = theta * scale ** (d / (d - 2))
  freqs = theta ** -exponents
  if scale > 1 and method == "interpolate":
    freqs = freqs / scale
  if scale > 1 and method == "yarn":
    alpha, beta = YARN_RAMP
    ratio = base_len * freqs / (2 * np.pi)  # trained length / wavelength
    keep = np.clip((ratio - alpha) / (beta - alpha), 0.0, 1.0)
    freqs = keep * freqs + (1 - keep) * freqs / scale
  return freqs


def sincos_1d(dim: int, pos: np.ndarray, freqs: np.ndarray | None = None
              ) -> np.ndarray:
  """(len(pos), dim) sin-cos table: the first half sines, the second cosines.

  freqs: the dim/2 frequencies; default 10000^(-i / (dim / 2)).
  """
  if freqs is None:
    freqs = scaled_frequencies(dim, 10000.0, 1.0, 1.0, "extrapolate")
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), freqs)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_grid=None,
              extrapolation: str = "extrapolate") -> np.ndarray:
  """Fixed 2D position embedding, (grid_h * grid_w, dim), row-major tokens.

  The first dim/2 channels encode the column and the last dim/2 the row, the
  layout of the MAE/DiT tables, so converted checkpoints see the same values.
  base_grid: the (rows, cols) trained on; a larger grid extends positions as
  `extrapolation` says (EXTRAPOLATIONS; no logit scale, there are no logits).
  """
  if dim % 4:
    raise ValueError(f"hidden_size must be divisible by 4 for the 2D sin-cos "
                     f"position embedding, got {dim}")
  scales = _axis_scales((grid_h, grid_w), base_grid)
  base = base_grid or (grid_h, grid_w)
  # sincos_1d's frequencies 10000^(-2i / (dim / 2)) over dim/4 sines.
  f_rows, f_cols = (scaled_frequencies(dim // 2, 10000.0, s, b, extrapolation)
                    for s, b in zip(scales, base))
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  return np.concatenate(
      [sincos_1d(dim // 2, cols, f_cols), sincos_1d(dim // 2, rows, f_rows)],
      axis=1).astype(np.float32)


def rotary_tables(grid_shape, head_dim: int, theta: float = 10000.0,
                  base_grid=None, extrapolation: str = "extrapolate"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin, each (L, head_dim), of the axial rotary position embedding.

  Row-major tokens on a 2D (H, W) or 3D (T, H, W) grid. head_dim is split
  into one equal part per grid axis (the first encodes the slowest axis);
  within a part, channels 2i and 2i+1 rotate together by position * theta **
  (-2i / part), the layout of EVA-02's 2D RoPE that LightningDiT uses, so
  converted checkpoints see the same rotations (apply with `apply_rotary`).
  base_grid: the grid trained on; a larger grid extends positions as
  `extrapolation` says (EXTRAPOLATIONS).
  """
  n = len(grid_shape)
  if head_dim % (2 * n):
    raise ValueError(f"rotary embedding on a {n}D grid needs head_dim "
                     f"divisible by {2 * n}, got head_dim={head_dim}")
  part = head_dim // n
  scales = _axis_scales(grid_shape, base_grid)
  base = base_grid or grid_shape
  coords = np.meshgrid(*[np.arange(s) for s in grid_shape], indexing="ij")
  angles = np.concatenate(
      [np.repeat(c.reshape(-1, 1) * scaled_frequencies(
          part, theta, s, b, extrapolation)[None], 2, axis=1)
       for c, s, b in zip(coords, scales, base)], axis=1)
  mscale = 1.0
  if extrapolation == "yarn" and np.prod(scales) > 1:
    mscale = 0.1 * np.log(np.prod(scales)) + 1.0  # on q and k: logits^2
  return ((mscale * np.cos(angles)).astype(np.float32),
          (mscale * np.sin(angles)).astype(np.float32))


def apply_rotary(x: jax.Array, cos, sin) -> jax.Array:
  """Rotates channel pairs (2i, 2i+1) of x (B, L, heads, head_dim), in f32."""
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(
      x.shape)
  cos, sin = (jnp.asarray(a)[None, :, None] for a in (cos, sin))
  return (xf * cos + rotated * sin).astype(x.dtype)


def timestep_frequencies(t: jax.Array, dim: int = 256,
                         max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of (possibly fractional) timesteps: (B,) -> (B, dim).

  Order [cos, sin] as in DiT/ADM; computed in float32 whatever the model dtype.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens: (B, H, W, C) -> (B, L, D)."""
  hidden_size: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(
        self.hidden_size, (p, p), strides=(p, p), padding="VALID",
        dtype=self.dtype, param_dtype=self.param_dtype,
        # DiT: xavier_uniform on the conv weight viewed as (D, C*p*p).
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("embed",)),
        name="proj")(x)
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d)


class TimestepEmbedder(nn.Module):
  """Scalar timesteps -> vectors: 256 sinusoidal features and a 2-layer MLP."""
  hidden_size: int
  frequency_size: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    init = nn.initializers.normal(0.02)
    x = timestep_frequencies(t, self.frequency_size).astype(self.dtype)
    x = dense(self.hidden_size, (None, "embed"), kernel_init=init,
              dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.silu(x)
    return dense(self.hidden_size, ("embed", "mlp"), kernel_init=init,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 name="fc2")(x)


class LabelEmbedder(nn.Module):
  """Class labels -> vectors, with a null class and label dropout for CFG.

  The table has num_classes + 1 rows when dropout_prob > 0 (row num_classes is
  the null label used by classifier-free guidance), as in DiT.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y, train: bool, force_drop_ids=None):
    """Embeds labels; with train=True drops them to the null class.

    force_drop_ids (B,) bool, when given, says which labels to drop instead
    of drawing from the "dropout" RNG (the trainer draws them per example so
    that results do not depend on how a batch is split).
    """
    rows = self.num_classes + int(self.dropout_prob > 0)
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                     ("vocab", "embed")),
        (rows, self.hidden_size), self.param_dtype)
    if train and self.dropout_prob > 0:
      if force_drop_ids is None:
        force_drop_ids = jax.random.bernoulli(self.make_rng("dropout"),
                                              self.dropout_prob, y.shape)
      y = jnp.where(force_drop_ids, self.num_classes, y)
    return jnp.take(table, y, axis=0)


def label_drop_mask(keys: jax.Array, prob: float) -> jax.Array:
  """Per-example label-dropout decisions from per-example keys: (B,) bool."""
  return jax.vmap(lambda k: jax.random.bernoulli(k, prob))(keys)
