"""Local (windowed) attention on 2D/3D token grids: Pallas kernels + reference.

Query i attends to key j iff their grid offset d satisfies
sum(d_a^2) <= window^2 ("circle", as in CLEAR) or max|d_a| <= window
("square", neighbourhood attention without border shifting); windows are
truncated at the grid border. Tokens are in row-major order over the grid.

The kernels (local_attention_kernels.py for GPU, local_attention_tpu.py for
TPU) run on tokens permuted into spatial tiles, and visit only the key blocks
a query block's window can reach (local_attention_geometry.py); cost scales
with the window area, not with N^2. The design follows FlashAttention-2 and
jax's ops/gpu/attention.py and splash attention (own code).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels import local_attention_kernels as gpu_kernels
from pallas_kernels import local_attention_tpu as tpu_kernels
from pallas_kernels.local_attention_geometry import Geometry

SHAPES = ("circle", "square")
# Logsumexp given to padded query rows so that their softmax weights are
# exactly 0 in the backward pass (their dO is 0, but 0 * inf is NaN).
_PAD_LSE = 0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tuning knobs. Blocks are token counts, powers of two <= the tile size.

  Attributes:
    tile: spatial tile shape (same rank as the grid, powers of two); tokens are
      permuted tile by tile, so a block is a box of the grid.
    block_q, block_k: forward query/key block sizes.
    block_q_bwd, block_k_bwd: backward block sizes.
    num_warps, num_stages: Triton parameters (None: chosen from head_dim).
  """
  tile: tuple[int, ...] | None = None
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  @classmethod
  def get_default(cls, backend: str = "gpu") -> "BlockSizes":
    if backend == "tpu":  # lane-dense (128) logits and lse blocks
      return cls(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
    return cls()


def _default_tile(ndim: int) -> tuple[int, ...]:
  # 128-token tiles: 8x16 patches (16 contiguous tokens per row for loads).
  return (8, 16) if ndim == 2 else (2, 4, 16)


def _check(q, k, v, grid_shape, window, shape):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must have shape (B, N, heads, head_dim), got "
                       f"{getattr(x, 'shape', type(x))}")
  if not q.shape == k.shape == v.shape:
    raise ValueError(f"q, k, v must have the same shape, got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must have the same dtype, got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
  grid = tuple(grid_shape) if isinstance(grid_shape, Sequence) else None
  if (grid is None or len(grid) not in (2, 3) or not all(
      isinstance(g, (int, np.integer)) and g > 0 for g in grid)):
    raise ValueError("grid_shape must be 2 (H, W) or 3 (T, H, W) positive "
                     f"ints, got {grid_shape!r}")
  grid = tuple(int(g) for g in grid)
  if math.prod(grid) != q.shape[1]:
    raise ValueError(f"grid_shape {grid} has {math.prod(grid)} tokens but "
                     f"q, k, v have N={q.shape[1]}; expected N == "
                     "prod(grid_shape)")
  if (isinstance(window, bool) or not isinstance(window, (int, np.integer))
      or window < 0):
    raise ValueError(f"window must be an int radius >= 0, got {window!r}")
  if shape not in SHAPES:
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
  return grid


def _geometry(grid, window, shape, tile=None) -> Geometry:
  # Clamp the radius to the largest useful one: same mask, no int32 overflow.
  if shape == "circle":
    d2 = sum((g - 1) ** 2 for g in grid)
    window = min(window, math.isqrt(d2 - 1) + 1 if d2 else 0)
  else:
    window = min(window, max(grid) - 1)
  tile = tuple(tile or _default_tile(len(grid)))
  if len(tile) != len(grid) or not all(
      isinstance(t, int) and t > 0 and t & (t - 1) == 0 for t in tile):
    raise ValueError(f"block_sizes.tile must be {len(grid)} powers of two, "
                     f"got {tile}")
  return Geometry(grid, tile, int(window), shape)


# ----------------------------------------------------------- reference ------


def local_attention_reference(q, k, v, *, grid_shape, window,
                              shape="circle", query_chunk=None):
  """Pure-jnp oracle: dense masked softmax in float32, chunked over queries.

  Queries are processed `query_chunk` at a time (rematerialised in the
  backward pass), so memory is O(query_chunk * N) rather than O(N^2). The
  default chunk keeps each chunk's logits under 2^28 floats (1 GiB).
  """
  grid = _check(q, k, v, grid_shape, window, shape)
  geo = _geometry(grid, window, shape)
  b, n, h, d = q.shape
  if query_chunk is None:
    query_chunk = max(256, (1 << 28) // (b * h * n))
  coords = jnp.asarray(geo.coords())
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  hi = jax.lax.Precision.HIGHEST

  def attend(qc, cq):
    s = jnp.einsum("bqhd,bkhd->bhqk", qc, kf, precision=hi) * d ** -0.5
    off = cq[:, None, :] - coords[None, :, :]
    if shape == "circle":
      vis = jnp.sum(off * off, -1) <= geo.window ** 2
    else:
      vis = jnp.max(jnp.abs(off), -1) <= geo.window
    p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=hi)

  if n <= query_chunk:
    out = attend(qf, coords)
  else:
    nc = -(-n // query_chunk)
    pad = nc * query_chunk - n
    qc = jnp.pad(qf, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qc.reshape(b, nc, query_chunk, h, d).swapaxes(0, 1)
    cq = jnp.pad(coords, ((0, pad), (0, 0))).reshape(nc, query_chunk, -1)
    out = jax.lax.map(lambda a: jax.checkpoint(attend)(*a), (qc, cq))
    out = out.swapaxes(0, 1).reshape(b, nc * query_chunk, h, d)[:, :n]
  return out.astype(q.dtype)


# -------------------------------------------------------------- kernels ------


def _valid_rows(geo: Geometry) -> np.ndarray:
  """Tile-order mask of real (non-padding) tokens."""
  return np.all(geo.block_base(1) < np.asarray(geo.grid), -1)


def _forward(q, k, v, cfg):
  if cfg.backend == "gpu":
    o, lse = gpu_kernels.gpu_forward(q, k, v, cfg)
  else:
    o, lse = tpu_kernels.tpu_forward(q, k, v, cfg)
  lse = jnp.where(jnp.asarray(_valid_rows(cfg.geo)), lse, _PAD_LSE)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend(q, k, v, cfg):
  return _forward(q, k, v, cfg)[0]


def _attend_fwd(q, k, v, cfg):
  o, lse = _forward(q, k, v, cfg)
  return o, (q, k, v, o, lse)


def _attend_bwd(cfg, res, do):
  q, k, v, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1)
  bwd = (gpu_kernels.gpu_backward if cfg.backend == "gpu"
         else tpu_kernels.tpu_backward)
  return bwd(q, k, v, do, lse, delta, cfg)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _kernel_config(q, geo, block_sizes, backend, interpret):
  bs = block_sizes or BlockSizes.get_default(backend)
  if block_sizes is None and backend == "gpu" and q.dtype.itemsize > 2:
    # 32-bit tiles: halve the query block to stay well inside shared memory.
    bs = dataclasses.replace(bs, block_q=64)
  d = q.shape[-1]
  dp = max(16, _next_pow2(d)) if backend == "gpu" else -(-d // 128) * 128
  clamp = lambda x: min(x, geo.tile_size)
  blocks = [clamp(x) for x in (bs.block_q, bs.block_k, bs.block_q_bwd,
                               bs.block_k_bwd)]
  least = 16 if backend == "gpu" else 8  # Triton dots; TPU sublanes
  if min(blocks) < least or any(x & (x - 1) for x in blocks):
    raise ValueError(f"block sizes (after clamping to the tile size "
                     f"{geo.tile_size}) must be powers of two >= {least}, "
                     f"got {blocks}")
  warps = bs.num_warps or (4 if dp <= 64 else 8)
  return gpu_kernels.Config(
      geo=geo, head_dim=dp, scale=d ** -0.5, block_q=blocks[0],
      block_k=blocks[1], block_q_bwd=blocks[2], block_k_bwd=blocks[3],
      backend=backend, interpret=interpret, num_warps=warps,
      num_stages=bs.num_stages)


def visited_fraction(grid_shape, window, shape="circle",
                     block_sizes: BlockSizes | None = None,
                     backend: str = "gpu") -> tuple[float, float]:
  """Fraction of (query block, key block) pairs the kernels visit.

  Returns:
    (forward, backward) fractions for the given blocks (as the kernel
    config clamps them); 1.0 would be dense attention.
  """
  grid = tuple(grid_shape)
  geo = _geometry(grid, window, shape,
                  block_sizes.tile if block_sizes else None)
  cfg = _kernel_config(jax.ShapeDtypeStruct((1, 1, 1, 64), jnp.bfloat16),
                       geo, block_sizes, backend, False)
  fwd, bwd = cfg.table(), cfg.table(bwd=True)
  return fwd.visited / fwd.pairs, bwd.visited / bwd.pairs


def _next_pow2(x: int) -> int:
  return 1 << (x - 1).bit_length()


def _pallas(q, k, v, *, geo, block_sizes, backend, interpret):
  """Permute to tiles, run the kernel, permute back (autodiff handles both)."""
  cfg = _kernel_config(q, geo, block_sizes, backend, interpret)
  d = q.shape[-1]
  qt, kt, vt = (geo.to_tiles(x, cfg.head_dim) for x in (q, k, v))
  return geo.from_tiles(_attend(qt, kt, vt, cfg), d)


def local_attention(q, k, v, *, grid_shape, window, shape="circle",
                    impl="auto", block_sizes: BlockSizes | None = None):
  """Windowed attention over tokens on a 2D or 3D grid.

  Args:
    q, k, v: (B, N, heads, head_dim), same dtype; N = prod(grid_shape), tokens
      in row-major order over the grid.
    grid_shape: (H, W) or (T, H, W).
    window: int radius >= 0.
    shape: "circle" (sum of squared offsets <= window^2) or "square"
      (max |offset| <= window). Windows are truncated at borders.
    impl: "auto" (Pallas on GPU/TPU, reference elsewhere), "pallas" (the
      kernel; interpret mode on CPU) or "reference".
    block_sizes: optional tuning (BlockSizes); defaults per backend.

  Returns:
    (B, N, heads, head_dim) in q's dtype; softmax scale head_dim ** -0.5.
  """
  grid = _check(q, k, v, grid_shape, window, shape)
  _backend.check_impl(impl)
  tile = block_sizes.tile if block_sizes else None
  geo = _geometry(grid, window, shape, tile)
  ref = functools.partial(local_attention_reference, grid_shape=grid,
                          window=window, shape=shape)
  kern = functools.partial(_pallas, geo=geo, block_sizes=block_sizes)
  run = _backend.select(
      impl, reference=ref,
      gpu=functools.partial(kern, backend="gpu", interpret=False),
      tpu=functools.partial(kern, backend="tpu", interpret=False),
      interpret=functools.partial(kern, backend="gpu", interpret=True))
  return run(q, k, v)
