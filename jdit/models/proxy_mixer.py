"""PT-DiT proxy-tokenized attention (Qihoo-T2X, Wang et al. 2024, 2409.04005).

Registered as the "proxy" mixer (jdit/models/mixers.py signature); it lives
apart from jdit/models/local_mixers.py, whose window helpers it reuses.

What the paper specifies, and what this module follows:
  * Proxy tokens are window averages (Sec. 3.2.1; Table 2b prefers averaging
    to the top-left or a random token).
  * The number of windows is the same at every image resolution (Sec. 3.2.3):
    compression ratios (1, 2, 2), (1, 4, 4), (1, 8, 8), (1, 16, 16) at 256,
    512, 1024 and 2048px, i.e. an 8 x 8 grid of proxies on the 16..128-token
    grids of the SD-VAE at patch 2. Hence `proxy_grid=8`, not a fixed window.
  * The Texture Complement Module attends inside windows of the same
    pt x ph x pw tokens (Sec. 3.2.2, and Eq. 4 counts 2 N (pt ph pw) D per
    window attention), followed by shifted-window attention.
  * A zero-initialised linear layer in the Global Information Interaction
    Module for training stability (Sec. 3.2.1). We read it as the output
    projection of the visual cross-attention, so the global branch starts
    switched off; the paper does not say where the layer sits.

Our choices: window and shifted-window attention share one qkv projection,
half of the heads in plain windows and half in windows shifted by half a
window (the registry gives every block the same options, so Swin's layer
alternation is done across heads). That is one projection's worth of FLOPs,
which is what the paper's own GFLOP figures imply (Fig. 2 and 8: PT-DiT/B,
/L, /H come to ~16 N D^2 multiply-adds per block with their text
cross-attention included; two full window attentions would make 20).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jdit.models.local_mixers import (_check_divides, _partition, _per_axis,
                                      _shifted_window_attention,
                                      _window_and_shift)
from jdit.models.mixers import (Projection, attention, out_projection,
                                qkv_projection, register_mixer)


def _head_projection(x, parts, num_heads, *, dtype, param_dtype, name):
  """(B, L, D) -> (B, L, parts, heads, head_dim), like qkv_projection."""
  d = x.shape[-1]
  return Projection((d,), (parts, num_heads, d // num_heads),
                    ("embed", None, "heads", "kv"), dtype=dtype,
                    param_dtype=param_dtype, name=name)(x)


def _pool(x, grid_shape, window):
  """Average-pools (B, L, D) tokens over windows: (B, num_windows, D)."""
  b = x.shape[0]
  w = _partition(x, grid_shape, window)
  return w.mean(axis=1).reshape(b, -1, x.shape[-1])


def proxy_sizes(grid_shape, proxy_grid=8, proxy_window=None, window=None,
                shift=None):
  """The proxy window, TCM window and shift per grid axis, checked.

  Args:
    grid_shape: the token grid, (H, W) or (T, H, W).
    proxy_grid: proxies per axis; an int applies to the two spatial axes and
      leaves time unpooled (pass a tuple, or proxy_window, to pool frames:
      the paper uses pt = 4 for video).
    proxy_window: tokens per proxy per axis; overrides proxy_grid.
    window: TCM window per axis; None means the proxy window (the paper).
    shift: TCM shift per axis; None means half the window (Swin), 0 none.

  Returns:
    (proxy_window, window, shift), tuples with one entry per grid axis.
  """
  grid_shape = tuple(grid_shape)
  if proxy_window is None:
    if isinstance(proxy_grid, int):
      counts = grid_shape[:-2] + (proxy_grid,) * min(2, len(grid_shape))
    else:
      counts = _per_axis(proxy_grid, grid_shape, "proxy_grid")
    _check_divides(counts, grid_shape, "proxy_grid")
    pwin = tuple(g // c for g, c in zip(grid_shape, counts))
  else:
    pwin = _per_axis(proxy_window, grid_shape, "proxy_window")
    _check_divides(pwin, grid_shape, "proxy_window")
  win = pwin if window is None else window
  if shift is None:
    shift = tuple(w // 2 for w in _per_axis(win, grid_shape, "window"))
  win, shift = _window_and_shift(win, shift, grid_shape)
  return pwin, win, shift


@register_mixer("proxy")
class ProxyAttention(nn.Module):
  """PT-DiT proxy-tokenized attention (GIIM + TCM of Qihoo-T2X).

  Global Information Interaction Module: one proxy token per proxy window
  (the window average), multi-head self-attention among the proxies, then
  every token cross-attends to the attended proxies through a
  zero-initialised output projection. Texture Complement Module: window
  attention in windows of `window` tokens, half the heads shifted by
  `shift` (see the module docstring).

  The paper adds GIIM and TCM with separate residuals: y = x + GIIM(x),
  out = y + TCM(y). Inside a DiT block the mixer output h is added once,
  gated by adaLN, so we return h = GIIM(x) + TCM(x + GIIM(x)); with gate 1
  this is the paper's two residual steps (our choice: one shared gate).

  Attributes:
    proxy_grid: proxies per axis (8: the paper's 8 x 8 proxies at every
      resolution, i.e. 2x2 windows at 256px, 8x8 at 1024px).
    proxy_window: tokens per proxy per axis; set to fix the window instead.
    window: TCM window per axis; None = the proxy window (the paper).
    shift: TCM shift of the shifted heads; None = window // 2, 0 disables.
  """
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  proxy_grid: int | Sequence[int] = 8
  proxy_window: int | Sequence[int] | None = None
  window: int | Sequence[int] | None = None
  shift: int | Sequence[int] | None = None

  def _sizes(self, grid_shape):
    return proxy_sizes(grid_shape, self.proxy_grid, self.proxy_window,
                       self.window, self.shift)

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del deterministic
    grid_shape = tuple(grid_shape)
    pwin, window, shift = self._sizes(grid_shape)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = self.num_heads
    # GIIM: proxies attend to each other, then tokens read from them.
    proxies = _pool(x, grid_shape, pwin)
    pq, pk, pv = qkv_projection(proxies, heads, name="proxy_qkv", **kw)
    proxies = out_projection(attention(pq, pk, pv), name="proxy_proj", **kw)
    q = _head_projection(x, 1, heads, name="cross_q", **kw)[:, :, 0]
    kv = _head_projection(proxies, 2, heads, name="cross_kv", **kw)
    g = out_projection(attention(q, kv[:, :, 0], kv[:, :, 1]),
                       name="cross_proj", kernel_init=nn.initializers.zeros,
                       **kw)
    # TCM on the GIIM-updated tokens.
    y = x + g
    wq, wk, wv = qkv_projection(y, heads, name="qkv", **kw)
    t = out_projection(
        _shifted_window_attention(wq, wk, wv, grid_shape, window, shift),
        name="proj", **kw)
    return g + t

  def macs(self, grid_shape, dim):
    """Projections and attention products of GIIM and TCM, per image."""
    length = math.prod(grid_shape)
    pwin, window, _ = self._sizes(tuple(grid_shape))
    m = length // math.prod(pwin)
    proxy = 4 * m * dim * dim + 2 * m * m * dim
    cross = 2 * length * dim * dim + 2 * m * dim * dim + 2 * length * m * dim
    tcm = 4 * length * dim * dim + 2 * length * math.prod(window) * dim
    return proxy + cross + tcm
