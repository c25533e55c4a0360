"""Linear-time token mixers: kernel linear attention and a multi-direction Mamba.

Both are registered in the mixer registry (jdit/models/mixers.py) with the
common signature `Mixer(num_heads=, dtype=, param_dtype=, **options)(x, *,
grid_shape, deterministic)`; x is (B, L, D), tokens row-major over the grid.

  linear  kernel-feature linear attention (Katharopoulos et al. 2020) through
          pallas_kernels.linear_attention, plus a depthwise-conv local term
          on the values as SANA / LinFusion-style DiTs add (FLatten, Han et
          al. 2023, adds it to the output the same way).
  mamba   a Mamba-1 block (Gu & Dao 2023) scanning the token grid in 1, 2
          or 4 directions (scan_orders.py) through one
          pallas_kernels.selective_scan call: forward and backward (Vim, Zhu
          et al. 2024; DiM, Teng et al. 2024) in raster or zigzag order
          (ZigMa, Hu et al. 2024), optionally also over the columns with a
          2D depthwise conv (VMamba's SS2D, Liu et al. 2024, which
          LaMamba-Diff uses).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.models import kernel_sharding, scan_orders
from jdit.models.mixers import out_projection, qkv_projection, register_mixer

FEATURE_MAPS = ("elu", "relu")
CONVS = ("causal1d", "depthwise2d")


def _depthwise_conv(x, grid_shape, kernel_size, *, dtype, param_dtype, name,
                    use_bias=True, kernel_init=None):
  """'SAME' depthwise conv of (B, L, C) row-major tokens over the grid."""
  b, length, c = x.shape
  ks = (kernel_size,) * len(grid_shape)
  if kernel_init is None:
    kernel_init = nn.initializers.lecun_normal()
  y = nn.Conv(
      c, ks, padding="SAME", feature_group_count=c, use_bias=use_bias,
      dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          kernel_init, (None,) * len(ks) + (None, "mlp")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             ("mlp",)),
      name=name)(x.reshape(b, *grid_shape, c))
  return y.reshape(b, length, c)


@register_mixer("linear")
class LinearAttention(nn.Module):
  """Linear attention with a depthwise-conv local term.

  out = linear_attention(q, k, v) + DWConv_k(v) over the token grid, then
  the output projection. The conv is zero-initialised, so a fresh layer is
  plain linear attention and learns its local term (our choice; SANA puts
  its 3x3 depthwise conv in the Mix-FFN, FLatten adds it to the attention
  output as here).

  Attributes:
    feature_map: "relu" (SANA) or "elu" (elu + 1, Katharopoulos et al.).
    conv_kernel: size of the depthwise conv (0 disables the local term).
    eps: denominator epsilon of the kernel.
    impl: kernel implementation, "auto", "pallas" or "reference".
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  feature_map: str = "relu"
  conv_kernel: int = 3
  eps: float = 1e-6
  impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del deterministic
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(f"linear mixer feature_map must be one of "
                       f"{FEATURE_MAPS}, got {self.feature_map!r}")
    if self.conv_kernel < 0:
      raise ValueError(f"conv_kernel must be >= 0, got {self.conv_kernel}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = qkv_projection(x, self.num_heads, **kw)
    o = kernel_sharding.kernel("linear_attention")(
        q, k, v, feature_map=self.feature_map, eps=self.eps, impl=self.impl)
    o = o.astype(self.dtype)
    if self.conv_kernel:
      b, length, heads, hd = v.shape
      local = _depthwise_conv(
          v.reshape(b, length, heads * hd), grid_shape, self.conv_kernel,
          kernel_init=nn.initializers.zeros_init(), name="dwconv", **kw)
      o = o + local.reshape(o.shape)
    return out_projection(o, **kw)

  def macs(self, grid_shape, dim):
    length = math.prod(grid_shape)
    hd = dim // self.num_heads
    # phi(k)^T v and phi(q) S (length*dim*hd each), plus the normaliser.
    attn = 2 * length * dim * hd + 2 * length * dim
    conv = length * dim * self.conv_kernel ** len(grid_shape)
    return 4 * length * dim * dim + attn + conv


def _dt_bias_init(dt_min, dt_max, floor=1e-4):
  """Mamba's dt init: softplus(bias) is log-uniform in [dt_min, dt_max]."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus

  return init


def _uniform(lo, hi):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, lo, hi)
  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: A[..., d, n] = -(n + 1), stored as log(n + 1)."""
  del key
  a = jnp.broadcast_to(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32), shape)
  return jnp.log(a).astype(dtype)


class _DirectionalCausalConv(nn.Module):
  """Mamba's causal depthwise conv1d on (B, L, K, C), own taps per direction.

  out_t = bias + sum_j kernel[j] * x_{t - taps + 1 + j} (zeros before t = 0)
  along each direction's sequence. Written as shifted products: taps is
  small, so XLA fuses them into one elementwise pass over the K directions.
  """
  taps: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, length, k, c = x.shape
    # fan_in = taps, as a (taps, 1, C) depthwise nn.Conv kernel would have.
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                         in_axis=0, out_axis=(1, 2)),
        (None, None, "mlp")), (self.taps, k, c), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (None, "mlp")), (k, c),
                      self.param_dtype)
    padded = jnp.pad(x, ((0, 0), (self.taps - 1, 0), (0, 0), (0, 0)))
    kernel = kernel.astype(self.dtype)
    out = bias.astype(self.dtype)
    for j in range(self.taps):
      out = out + kernel[j] * padded[:, j:j + length]
    return out


@register_mixer("mamba")
class Mamba(nn.Module):
  """A Mamba-1 block scanning the token grid in 1, 2 or 4 directions.

  in_proj to 2 * expand * D (x and the gate z); a depthwise conv + SiLU; per
  direction x_proj to (dt_rank + 2 * state) and dt_proj with Mamba's dt init
  (softplus(bias) log-uniform in [1e-3, 1e-1]), A = -exp(A_log) with the
  S4D-real init and the D skip; the directions' outputs are averaged,
  optionally LayerNormed, gated by silu(z) and projected back by out_proj.

  Directions (jdit/models/scan_orders.py): the tokens in scan_order; with
  cross_scan, also that order over the columns; with bidirectional, each
  of those reversed. They share in_proj, z, the 2D conv and out_proj; each
  has its own x_proj, dt_proj, A, D (and conv1d taps). All directions run
  as one selective_scan, stacked along channels as (B, L, K * inner) with
  one group of B and C per direction, so each keeps its parameters and the
  kernel sees one wide problem. The gate is applied once after the merge,
  which equals gating every direction (z is per token) at 1/K the work.

  The defaults are Vim's bidirectional "v2" block as DiM uses it (causal
  conv1d per direction). VMamba's SS2D is cross_scan=True,
  conv="depthwise2d", d_conv=3, out_norm=True (LaMamba-Diff adds zigzag,
  its "continuous" scan). DiM also rotates scan directions across layers and
  pads rows with learned tokens; neither fits the one-mixer-per-backbone
  registry, so not here.

  Attributes:
    state: SSM state size N (16).
    expand: inner width factor E (2).
    d_conv: conv taps per axis (4).
    dt_rank: rank of dt; 0 means ceil(D / 16) as in Mamba.
    scan_order: "raster" (row-major) or "zigzag" (rows snake).
    bidirectional: also scan every order backwards.
    cross_scan: also scan column-major (SS2D's cross scan; grids of >= 2
      axes, each frame of a (T, H, W) grid transposed).
    conv: "causal1d" (Mamba: causal along each direction's sequence, own
      taps per direction) or "depthwise2d" (SS2D as LaMamba-Diff configures
      it: one bias-free d_conv x d_conv depthwise conv over the token grid,
      per frame of a (T, H, W) grid, shared by the directions).
    out_norm: LayerNorm the merged scan output before the gate (SS2D).
    impl: kernel implementation, "auto", "pallas" or "reference".
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  state: int = 16
  expand: int = 2
  d_conv: int = 4
  dt_rank: int = 0
  scan_order: str = "raster"
  bidirectional: bool = True
  cross_scan: bool = False
  conv: str = "causal1d"
  out_norm: bool = False
  impl: str = "auto"

  @property
  def num_directions(self) -> int:
    return scan_orders.num_directions(self.cross_scan, self.bidirectional)

  def _rank(self, dim):
    return self.dt_rank or math.ceil(dim / 16)

  def _check(self, grid_shape):
    for field in ("state", "expand", "d_conv"):
      if getattr(self, field) < 1:
        raise ValueError(f"mamba {field} must be >= 1, got "
                         f"{getattr(self, field)}")
    if self.dt_rank < 0:
      raise ValueError(f"mamba dt_rank must be >= 0 (0: ceil(D / 16)), got "
                       f"{self.dt_rank}")
    if self.conv not in CONVS:
      raise ValueError(f"mamba conv must be one of {CONVS}, got "
                       f"{self.conv!r}")
    if self.conv == "depthwise2d" and len(grid_shape) < 2:
      raise ValueError(f"mamba conv='depthwise2d' needs a grid of at least "
                       f"2 axes, got grid_shape {tuple(grid_shape)}")
    scan_orders.check_scan(grid_shape, self.scan_order, self.cross_scan)

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del deterministic  # num_heads is unused: Mamba-1 has no heads
    grid_shape = tuple(grid_shape)
    self._check(grid_shape)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, length, dim = x.shape
    inner, rank, n = self.expand * dim, self._rank(dim), self.state
    k = self.num_directions
    scan = dict(order=self.scan_order, cross=self.cross_scan,
                bidirectional=self.bidirectional)
    xz = nn.Dense(
        2 * inner, use_bias=False,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")),
        name="in_proj", **kw)(x)
    u, z = jnp.split(xz, 2, axis=-1)
    if self.conv == "depthwise2d":
      # Frames of a (T, H, W) grid as batch: (B * T, H * W, inner).
      frames = u.reshape(-1, math.prod(grid_shape[-2:]), inner)
      u = _depthwise_conv(frames, grid_shape[-2:], self.d_conv,
                          use_bias=False, name="conv2d", **kw).reshape(u.shape)
      us = scan_orders.split_directions(nn.silu(u), grid_shape, **scan)
    else:
      us = scan_orders.split_directions(u, grid_shape, **scan)
      us = nn.silu(_DirectionalCausalConv(self.d_conv, name="conv1d",
                                          **kw)(us))
    # us: (B, L, K, inner), direction k's sequence in its scan order.
    x_proj = self.param("x_proj", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(batch_axis=(0,)), (None, "mlp", None)),
                        (k, inner, rank + 2 * n), self.param_dtype)
    dt, b, c = jnp.split(
        jnp.einsum("blki,kio->blko", us, x_proj.astype(self.dtype)),
        [rank, rank + n], axis=-1)
    std = rank ** -0.5
    dt_proj = self.param("dt_proj", nn.with_logical_partitioning(
        _uniform(-std, std), (None, None, "mlp")), (k, rank, inner),
                         self.param_dtype)
    delta = jnp.einsum("blkr,kri->blki", dt, dt_proj.astype(self.dtype))
    dt_bias = self.param("dt_bias", nn.with_logical_partitioning(
        _dt_bias_init(1e-3, 1e-1), (None, "mlp")), (k, inner),
                         self.param_dtype)
    a_log = self.param("A_log", nn.with_logical_partitioning(
        _a_log_init, (None, "mlp", None)), (k, inner, n), self.param_dtype)
    d_skip = self.param("D", nn.with_logical_partitioning(
        nn.initializers.ones_init(), (None, "mlp")), (k, inner),
                        self.param_dtype)
    wide = (batch, length, k * inner)  # channel k * inner + i reads group k
    y = kernel_sharding.kernel("selective_scan")(
        us.reshape(wide), delta.reshape(wide),
        -jnp.exp(a_log.astype(jnp.float32)).reshape(k * inner, n), b, c,
        D=d_skip.reshape(-1), delta_bias=dt_bias.reshape(-1),
        delta_softplus=True, impl=self.impl)
    y = scan_orders.merge_directions(
        y.reshape(batch, length, k, inner).astype(jnp.float32), grid_shape,
        **scan) / k
    if self.out_norm:
      y = nn.LayerNorm(
          epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
          scale_init=nn.with_logical_partitioning(
              nn.initializers.ones_init(), ("mlp",)),
          bias_init=nn.with_logical_partitioning(
              nn.initializers.zeros_init(), ("mlp",)), name="out_norm")(y)
    y = y.astype(self.dtype) * nn.silu(z)
    return nn.Dense(
        dim, use_bias=False,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "embed")),
        name="out_proj", **kw)(y)

  def macs(self, grid_shape, dim):
    length = math.prod(grid_shape)
    inner, rank, k = self.expand * dim, self._rank(dim), self.num_directions
    if self.conv == "depthwise2d":
      conv = self.d_conv ** 2  # one conv over each frame, shared
    else:
      conv = k * self.d_conv  # own taps per direction
    # Per direction: x_proj, dt_proj and the scan (delta*B*u,
    # exp(delta A)*h + ., C.h: 3 MACs per channel and state).
    per_dir = rank + 2 * self.state + rank + 3 * self.state
    return length * dim * 3 * inner + length * inner * (conv + k * per_dir)
