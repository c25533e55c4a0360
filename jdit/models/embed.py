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


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """(len(pos), dim) sin-cos table: the first half sines, the second cosines."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2D position embedding, (grid_h * grid_w, dim), row-major tokens.

  The first dim/2 channels encode the column and the last dim/2 the row, the
  layout of the MAE/DiT tables, so converted checkpoints see the same values.
  """
  if dim % 4:
    raise ValueError(f"hidden_size must be divisible by 4 for the 2D sin-cos "
                     f"position embedding, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  return np.concatenate(
      [sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1
  ).astype(np.float32)


def rotary_tables(grid_shape, head_dim: int, theta: float = 10000.0
                  ) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin, each (L, head_dim), of the axial rotary position embedding.

  Row-major tokens on a 2D (H, W) or 3D (T, H, W) grid. head_dim is split
  into one equal part per grid axis (the first encodes the slowest axis);
  within a part, channels 2i and 2i+1 rotate together by position * theta **
  (-2i / part), the layout of EVA-02's 2D RoPE that LightningDiT uses, so
  converted checkpoints see the same rotations (apply with `apply_rotary`).
  """
  n = len(grid_shape)
  if head_dim % (2 * n):
    raise ValueError(f"rotary embedding on a {n}D grid needs head_dim "
                     f"divisible by {2 * n}, got head_dim={head_dim}")
  part = head_dim // n
  freqs = 1.0 / theta ** (np.arange(0, part, 2, dtype=np.float64) / part)
  coords = np.meshgrid(*[np.arange(s) for s in grid_shape], indexing="ij")
  angles = np.concatenate(
      [np.repeat(c.reshape(-1, 1) * freqs[None], 2, axis=1) for c in coords],
      axis=1)
  return (np.cos(angles).astype(np.float32),
          np.sin(angles).astype(np.float32))


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
