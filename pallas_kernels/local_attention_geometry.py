"""Token geometry for local attention: tiling, block tables, window masks.

The kernels work on tokens permuted from raster order into spatial tiles
(e.g. 8x16 patches of a 2D grid), so that a contiguous block of the permuted
sequence is a small box of the grid and a query block's window touches only a
few key blocks. Everything here is static (numpy at trace time) except
`window_mask`, which builds the per-element mask inside a kernel.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite mask value (as jax's flash kernels): -inf would make fully masked rows
# produce exp(-inf - -inf) = NaN in the online softmax.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A 2D (H, W) or 3D (T, H, W) token grid cut into tiles.

  Attributes:
    grid: the grid shape, row-major token order.
    tile: tile shape, same rank, every entry a power of two.
    window: the window radius.
    shape: "circle" or "square".
  """
  grid: tuple[int, ...]
  tile: tuple[int, ...]
  window: int
  shape: str

  @property
  def ndim(self) -> int:
    return len(self.grid)

  @property
  def ntiles(self) -> tuple[int, ...]:
    return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

  @property
  def padded(self) -> tuple[int, ...]:
    return tuple(n * t for n, t in zip(self.ntiles, self.tile))

  @property
  def tile_size(self) -> int:
    return math.prod(self.tile)

  @property
  def num_tokens(self) -> int:
    return math.prod(self.grid)

  @property
  def padded_tokens(self) -> int:
    return math.prod(self.padded)

  def box(self, block: int) -> tuple[int, ...]:
    """Grid box covered by `block` consecutive permuted tokens (aligned)."""
    if not _is_pow2(block) or block > self.tile_size:
      raise ValueError(f"block size must be a power of two <= tile size "
                       f"{self.tile_size}, got {block}")
    box, rem = [], block
    for t in reversed(self.tile):
      b = min(t, rem)
      box.append(b)
      rem //= b
    return tuple(reversed(box))

  def block_base(self, block: int) -> np.ndarray:
    """Grid coordinates of the first token of every block: (nblocks, ndim)."""
    starts = np.arange(self.padded_tokens // block) * block
    tile_idx, within = np.divmod(starts, self.tile_size)
    tcoord = np.stack(np.unravel_index(tile_idx, self.ntiles), -1)
    local = np.stack(np.unravel_index(within, self.tile), -1)
    return (tcoord * np.asarray(self.tile) + local).astype(np.int32)

  def to_tiles(self, x: jax.Array, head_dim: int) -> jax.Array:
    """(B, N, heads, D) raster order -> (B, heads, Np, head_dim) tile order.

    Pads the grid to whole tiles and the feature axis to `head_dim` with
    zeros (zero-padded features change no dot product).
    """
    b, _, h, d = x.shape
    x = x.reshape(b, *self.grid, h, d)
    pads = [(0, 0)] + [(0, p - g) for p, g in zip(self.padded, self.grid)]
    x = jnp.pad(x, pads + [(0, 0), (0, head_dim - d)])
    split = []
    for n, t in zip(self.ntiles, self.tile):
      split += [n, t]
    x = x.reshape(b, *split, h, head_dim)
    k = self.ndim
    perm = ([0, 2 * k + 1] + [1 + 2 * a for a in range(k)]
            + [2 + 2 * a for a in range(k)] + [2 * k + 2])
    return x.transpose(perm).reshape(b, h, self.padded_tokens, head_dim)

  def from_tiles(self, x: jax.Array, head_dim: int) -> jax.Array:
    """Inverse of `to_tiles`: drops grid and feature padding."""
    b, h, _, dp = x.shape
    k = self.ndim
    x = x.reshape(b, h, *self.ntiles, *self.tile, dp)
    perm = [0]
    for a in range(k):
      perm += [2 + a, 2 + k + a]
    perm += [1, 2 + 2 * k]
    x = x.transpose(perm).reshape(b, *self.padded, h, dp)
    x = x[(slice(None),) + tuple(slice(0, g) for g in self.grid)]
    return x[..., :head_dim].reshape(b, self.num_tokens, h, head_dim)

  def visible(self, gap2: np.ndarray, gapmax: np.ndarray) -> np.ndarray:
    """Window test given sum of squared offsets and the max |offset|."""
    if self.shape == "circle":
      return gap2 <= self.window ** 2
    return gapmax <= self.window

  def coords(self) -> np.ndarray:
    """Raster-order grid coordinates of every token: (N, ndim)."""
    return np.stack(np.unravel_index(np.arange(self.num_tokens), self.grid),
                    -1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class BlockTable:
  """Which key blocks each query block visits (or the transpose).

  Rows list the visited column blocks, blocks needing an element mask first
  (`num_masked`), then fully visible ones, up to `num_total`; unused slots
  repeat the last entry so a TPU pipeline issues no new copy for them.
  """
  index: np.ndarray      # (rows, width) int32
  num_masked: np.ndarray  # (rows,) int32
  num_total: np.ndarray   # (rows,) int32
  visited: int            # block pairs visited
  pairs: int              # all block pairs

  @property
  def width(self) -> int:
    return self.index.shape[1]


def block_table(geo: Geometry, block_q: int, block_k: int,
                transpose: bool = False) -> BlockTable:
  """Block-sparse structure of the window for (block_q, block_k) blocks.

  Blocks are boxes, so the exact min and max offsets between two blocks are
  per-axis box gaps; a pair is visited iff some (valid) query/key pair is in
  the window, and needs no mask iff every such pair is and no key is padding.
  """
  grid = np.asarray(geo.grid)

  def boxes(block):
    lo = geo.block_base(block)
    hi = np.minimum(lo + np.asarray(geo.box(block)) - 1, grid - 1)
    return lo, hi, np.all(lo < grid, -1), np.all(hi == lo + np.asarray(
        geo.box(block)) - 1, -1)

  qlo, qhi, qany, _ = boxes(block_q)
  klo, khi, kany, kfull = boxes(block_k)
  qlo, qhi = qlo[:, None], qhi[:, None]
  klo, khi = klo[None], khi[None]
  gap = np.maximum(0, np.maximum(klo - qhi, qlo - khi))
  span = np.maximum(khi - qlo, qhi - klo)
  valid = qany[:, None] & kany[None]
  any_vis = valid & geo.visible((gap ** 2).sum(-1), gap.max(-1))
  all_vis = any_vis & kfull[None] & geo.visible((span ** 2).sum(-1),
                                                span.max(-1))
  if transpose:
    any_vis, all_vis = any_vis.T, all_vis.T
  rows = any_vis.shape[0]
  width = max(1, int(any_vis.sum(1).max(initial=0)))
  index = np.zeros((rows, width), np.int32)
  num_masked = np.zeros(rows, np.int32)
  num_total = np.zeros(rows, np.int32)
  for r in range(rows):
    part = np.nonzero(any_vis[r] & ~all_vis[r])[0]
    full = np.nonzero(all_vis[r])[0]
    cols = np.concatenate([part, full]).astype(np.int32)
    num_masked[r], num_total[r] = len(part), len(cols)
    if len(cols):
      index[r, :len(cols)] = cols
      index[r, len(cols):] = cols[-1]
  return BlockTable(index, num_masked, num_total, int(any_vis.sum()),
                    int(any_vis.size))


def _block_coords(geo: Geometry, base, block: int, on_rows: bool):
  """Grid coordinates of a block's tokens, as (block, 1) or (1, block).

  Computed on a vector, not on the (rows, cols) tile, so that the per-element
  mask costs only a few float ops. Returns one entry per axis: an int32
  array, or a scalar where the block's box has extent 1 on that axis.
  """
  shape = (block, 1) if on_rows else (1, block)
  idx = jax.lax.broadcasted_iota(jnp.int32, shape, 0 if on_rows else 1)
  box = geo.box(block)
  out, stride = [], 1
  for b in reversed(box):  # unravel with shifts: extents are powers of two
    c = idx if stride == 1 else idx >> (stride.bit_length() - 1)
    out.append(None if b == 1 else (
        c if b * stride == block else c & (b - 1)))
    stride *= b
  return [base[a] if c is None else c + base[a]
          for a, c in enumerate(reversed(out))]


def window_mask(geo: Geometry, q_base, k_base, block_q: int, block_k: int,
                keys_on_rows: bool = False) -> jax.Array:
  """In-kernel element mask of one (query block, key block) pair.

  Args:
    geo: the geometry.
    q_base, k_base: sequences of ndim int32 scalars, the grid coordinates of
      each block's first token.
    block_q, block_k: block sizes.
    keys_on_rows: build the (block_k, block_q) mask instead.

  Returns:
    bool (block_q, block_k) (or transposed): key visible and not padding.
  """
  qc = _block_coords(geo, q_base, block_q, not keys_on_rows)
  kc = _block_coords(geo, k_base, block_k, keys_on_rows)
  # Padding keys get a far-away coordinate instead of a separate validity
  # test on every element; exact in float32, beyond any clamped radius.
  valid = None
  for a in range(geo.ndim):
    if geo.padded[a] != geo.grid[a]:
      v = kc[a] < geo.grid[a]
      valid = v if valid is None else valid & v
  if valid is not None:
    kc[0] = jnp.where(valid, kc[0], -4 * max(geo.padded) - 4)
  dist = None
  for a in range(geo.ndim):
    d = (qc[a] - kc[a]).astype(jnp.float32)
    if geo.shape == "circle":
      d = d * d
      dist = d if dist is None else dist + d
    else:
      d = jnp.abs(d)
      dist = d if dist is None else jnp.maximum(dist, d)
  limit = geo.window ** 2 if geo.shape == "circle" else geo.window
  shape = (block_k, block_q) if keys_on_rows else (block_q, block_k)
  return jnp.broadcast_to(dist <= float(limit), shape)
