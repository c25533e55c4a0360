"""Sparse-attention token mixers: local, window and kv_compress.

Each class is registered in the mixer registry (jdit/models/mixers.py) and has
the common signature `Mixer(num_heads=, dtype=, param_dtype=, **options)(x, *,
grid_shape, deterministic)`; x is (B, L, D) with L = prod(grid_shape) tokens
in row-major order over a 2D (H, W) or 3D (T, H, W) grid.

  local        CLEAR (Liu et al. 2024): each query sees the keys within a
               circle (or square) of radius `window` on the token grid.
  window       Swin-style partitioned windows (DiT-3D, PT-DiT), optionally
               with masked shifted windows.
  kv_compress  PixArt-Sigma (Chen et al. 2024): keys and values downsampled
               by a strided depthwise conv before dense attention.

Every mixer may also define `macs(grid_shape, dim)`, its multiply-adds per
image, which jdit.models.flops uses for the analytic FLOP count. The PT-DiT
proxy mixer, which reuses the window helpers here, is in proxy_mixer.py.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit.models import kernel_sharding
from jdit.models.mixers import (attention, out_projection, qkv_projection,
                                register_mixer)


def _per_axis(value, grid_shape, what: str) -> tuple[int, ...]:
  """An int or a per-axis tuple, as a tuple with one entry per grid axis."""
  if isinstance(value, int):
    return (value,) * len(grid_shape)
  value = tuple(value)
  if len(value) != len(grid_shape):
    raise ValueError(f"{what} {value} must have one entry per grid axis "
                     f"{tuple(grid_shape)}")
  return value


def _check_divides(size, grid_shape, what: str) -> None:
  if any(s < 1 or g % s for s, g in zip(size, grid_shape)):
    raise ValueError(f"{what} {tuple(size)} must divide the token grid "
                     f"{tuple(grid_shape)} along every axis")


def _partition(x, grid_shape, window):
  """(B, L, ...) -> (B * num_windows, prod(window), ...), windows row-major."""
  b, rest = x.shape[0], x.shape[2:]
  nd = len(grid_shape)
  split = []
  for g, w in zip(grid_shape, window):
    split += [g // w, w]
  x = x.reshape(b, *split, *rest)
  # (b, n0, w0, n1, w1, ...) -> (b, n0, n1, ..., w0, w1, ...).
  perm = ([0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
          + list(range(1 + 2 * nd, x.ndim)))
  x = x.transpose(perm)
  return x.reshape(b * math.prod(split[::2]), math.prod(window), *rest)


def _unpartition(x, batch, grid_shape, window):
  """Inverse of `_partition`."""
  nd = len(grid_shape)
  counts = [g // w for g, w in zip(grid_shape, window)]
  rest = x.shape[2:]
  x = x.reshape(batch, *counts, *window, *rest)
  perm = [0]
  for i in range(nd):
    perm += [1 + i, 1 + nd + i]
  perm += list(range(1 + 2 * nd, x.ndim))
  return x.transpose(perm).reshape(batch, math.prod(grid_shape), *rest)


def _roll(x, grid_shape, shift):
  """Cyclically shifts (B, L, ...) tokens by `shift` along each grid axis."""
  b, rest = x.shape[0], x.shape[2:]
  x = x.reshape(b, *grid_shape, *rest)
  x = jnp.roll(x, shift, axis=tuple(range(1, 1 + len(grid_shape))))
  return x.reshape(b, -1, *rest)


def _shift_mask(grid_shape, window, shift) -> np.ndarray:
  """Swin's mask for cyclically shifted windows: (num_windows, 1, T, T).

  After rolling by -shift, a window at the far edge holds tokens from opposite
  borders of the image; tokens may only attend within their original region.
  """
  label = np.zeros(grid_shape, np.int32)
  for axis, (g, w, s) in enumerate(zip(grid_shape, window, shift)):
    region = np.zeros(g, np.int32)
    if s:
      region[g - w:g - s] = 1
      region[g - s:] = 2
    shape = [1] * len(grid_shape)
    shape[axis] = g
    label = label * 3 + region.reshape(shape)
  label = label.reshape(1, -1, 1)
  windows = np.asarray(_partition(label, grid_shape, window))[..., 0]
  return (windows[:, None, :, None] == windows[:, None, None, :])


def window_attention(q, k, v, grid_shape, window, shift=None):
  """Dense attention inside non-overlapping windows of the token grid.

  Args:
    q, k, v: (B, L, heads, head_dim), tokens row-major over grid_shape.
    grid_shape: the token grid.
    window: window size per axis (must divide the grid).
    shift: None, or the Swin cyclic shift per axis (0 <= shift < window).

  Returns:
    (B, L, heads, head_dim).
  """
  b = q.shape[0]
  if shift is not None and any(shift):
    neg = tuple(-s for s in shift)
    q, k, v = (_roll(t, grid_shape, neg) for t in (q, k, v))
  qw, kw, vw = (_partition(t, grid_shape, window) for t in (q, k, v))
  mask = None
  if shift is not None and any(shift):
    m = _shift_mask(grid_shape, window, shift)
    nwin = m.shape[0]
    mask = jnp.broadcast_to(jnp.asarray(m)[None], (b,) + m.shape)
    mask = mask.reshape(b * nwin, *m.shape[1:])
  o = jax.nn.dot_product_attention(qw, kw, vw, mask=mask)
  o = _unpartition(o, b, grid_shape, window)
  if shift is not None and any(shift):
    o = _roll(o, grid_shape, tuple(shift))
  return o


def _shifted_window_attention(q, k, v, grid_shape, window, shift):
  """Window attention; with a shift, the second half of the heads is shifted.

  The registry builds one mixer per block with the same options in every
  layer, so Swin's alternation of plain and shifted layers is done across
  heads instead: every layer then links neighbouring windows.
  """
  if not any(shift):
    return window_attention(q, k, v, grid_shape, window)
  heads = q.shape[2]
  h0 = heads // 2
  shifted = window_attention(q[:, :, h0:], k[:, :, h0:], v[:, :, h0:],
                             grid_shape, window, shift)
  if h0 == 0:
    return shifted
  plain = window_attention(q[:, :, :h0], k[:, :, :h0], v[:, :, :h0],
                           grid_shape, window)
  return jnp.concatenate([plain, shifted], axis=2)


def _window_and_shift(window, shift, grid_shape, what="window"):
  window = _per_axis(window, grid_shape, what)
  _check_divides(window, grid_shape, what)
  shift = _per_axis(shift, grid_shape, "shift")
  if any(not 0 <= s < w for s, w in zip(shift, window)):
    raise ValueError(f"shift {shift} must satisfy 0 <= shift < {what} "
                     f"{window} on every axis")
  return window, shift


@register_mixer("local")
class LocalAttention(nn.Module):
  """CLEAR local attention: a circle (or square) of radius `window`.

  Query i attends to key j iff their grid offset d has sum(d^2) <= window^2
  (circle) or max|d| <= window (square); windows are truncated at the
  borders. The attention runs in pallas_kernels.local_attention (Pallas on
  GPU/TPU, a reference elsewhere with impl="auto").

  Attributes:
    window: radius in tokens (CLEAR uses 8 on FLUX-scale grids; our named
      models use 8 on the 16x16 grid of a 256px image at patch 2).
    shape: "circle" (CLEAR) or "square".
    impl: kernel implementation, "auto", "pallas" or "reference".
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  window: int = 8
  shape: str = "circle"
  impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del deterministic
    if self.shape not in ("circle", "square"):
      raise ValueError(f"local mixer shape must be 'circle' or 'square', got "
                       f"{self.shape!r}")
    if self.window < 0:
      raise ValueError(f"local mixer window must be >= 0, got {self.window}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = qkv_projection(x, self.num_heads, **kw)
    o = kernel_sharding.kernel("local_attention")(
        q, k, v, grid_shape=tuple(grid_shape), window=self.window,
        shape=self.shape, impl=self.impl)
    return out_projection(o.astype(self.dtype), **kw)

  def macs(self, grid_shape, dim):
    """qkv/proj matmuls plus q.k and a.v over each query's truncated window."""
    length = math.prod(grid_shape)
    axes = [np.arange(-self.window, self.window + 1)] * len(grid_shape)
    offs = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1,
                                                                  len(axes))
    if self.shape == "circle":
      offs = offs[(offs ** 2).sum(-1) <= self.window ** 2]
    pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid_shape],
                               indexing="ij"), -1).reshape(-1, len(axes))
    keys = 0
    for off in offs:  # count the (query, key) pairs inside the grid
      p = pos + off
      keys += int(np.all((p >= 0) & (p < np.asarray(grid_shape)), -1).sum())
    return 4 * length * dim * dim + 2 * keys * dim


@register_mixer("window")
class WindowAttention(nn.Module):
  """Swin-style attention in non-overlapping windows, optionally shifted.

  Tokens are partitioned into windows of `window` tokens per axis (which must
  divide the grid) and attend densely within them (jax.nn.dot_product_
  attention). With `shift` > 0, the second half of the heads attends in
  windows cyclically shifted by `shift` with Swin's mask, so every layer
  connects neighbouring windows (Swin alternates shifted layers instead; the
  registry gives every block the same options).

  Attributes:
    window: window size per axis (int, or a tuple per grid axis).
    shift: cyclic shift (int or tuple); 0 disables; Swin uses window // 2.
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  window: int | Sequence[int] = 8
  shift: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del deterministic
    window, shift = _window_and_shift(self.window, self.shift, grid_shape)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = qkv_projection(x, self.num_heads, **kw)
    o = _shifted_window_attention(q, k, v, tuple(grid_shape), window, shift)
    return out_projection(o, **kw)

  def macs(self, grid_shape, dim):
    window = _per_axis(self.window, grid_shape, "window")
    length = math.prod(grid_shape)
    return 4 * length * dim * dim + 2 * length * math.prod(window) * dim


@register_mixer("kv_compress")
class KVCompressAttention(nn.Module):
  """PixArt-Sigma attention with key/value token compression.

  Keys and values (after the qkv projection) are each downsampled on the
  token grid by one shared depthwise conv with kernel = stride = `ratio`,
  initialised to the window average (weights 1/ratio^2, zero bias) and
  followed by a LayerNorm, as PixArt-Sigma's AttentionKVCompress does; the
  queries keep full resolution. ratio=1 is exactly full attention (no conv).
  On a 3D grid only the spatial (H, W) axes are compressed.

  Attributes:
    ratio: spatial downsampling factor of keys and values (PixArt-Sigma: 2).
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  ratio: int = 2

  def _strides(self, grid_shape):
    if self.ratio < 1:
      raise ValueError(f"kv_compress ratio must be >= 1, got {self.ratio}")
    strides = (1,) * (len(grid_shape) - 2) + (self.ratio, self.ratio)
    _check_divides(strides, grid_shape, f"kv_compress ratio {self.ratio}:"
                   " kernel")
    return strides

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del deterministic
    grid_shape = tuple(grid_shape)
    strides = self._strides(grid_shape)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = qkv_projection(x, self.num_heads, **kw)
    if self.ratio > 1:
      b, _, heads, hd = k.shape
      d = heads * hd
      conv = nn.Conv(
          d, strides, strides=strides, padding="VALID", feature_group_count=d,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.constant(1.0 / math.prod(strides)),
              (None,) * len(strides) + (None, "embed")),
          bias_init=nn.with_logical_partitioning(
              nn.initializers.zeros_init(), ("embed",)),
          name="sr", **kw)
      norm = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32,
                          param_dtype=self.param_dtype, name="norm")

      def compress(t):
        t = conv(t.reshape(b, *grid_shape, d))
        return norm(t).astype(self.dtype).reshape(b, -1, heads, hd)

      k, v = compress(k), compress(v)
    o = attention(q, k, v)
    return out_projection(o, **kw)

  def macs(self, grid_shape, dim):
    length = math.prod(grid_shape)
    m = length // math.prod(self._strides(grid_shape))
    conv = 2 * length * dim if self.ratio > 1 else 0
    return 4 * length * dim * dim + conv + 2 * length * m * dim
