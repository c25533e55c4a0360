"""Scan orders: a token grid as one or more 1D sequences for a selective scan.

A Mamba-style mixer sees the row-major tokens of an (H, W) or (T, H, W) grid
as a sequence. `split_directions` puts them into every scan direction at
once, stacked on a new axis, and `merge_directions` maps the per-direction
outputs back to row-major order and sums them (VMamba's "cross scan" and
"cross merge"). Directions, in this order:

  rows      the tokens in `order`: "raster" (row-major; Vim, DiM) or "zigzag"
            (every other row reversed, so consecutive tokens are always grid
            neighbours; ZigMa's simplest 2D scan, LaMamba-Diff's "continuous"
            scan)
  columns   with cross=True, the same order over the transposed grid: the
            column-major scan (VMamba SS2D); on a (T, H, W) grid each frame
            is transposed and frames stay in sequence
  reversed  with bidirectional=True, each of the above reversed

Both are built from reshape, transpose, flip and select, never a gather: XLA
fuses them into the neighbouring ops, and their gradients (each other's
transpose) are the same cheap ops rather than scatter-adds.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SCAN_ORDERS = ("raster", "zigzag")


def check_scan(grid_shape, order: str, cross: bool) -> None:
  """Raises ValueError for an unknown order or a cross scan of a 1D grid."""
  if order not in SCAN_ORDERS:
    raise ValueError(f"scan_order must be one of {SCAN_ORDERS}, got "
                     f"{order!r}")
  if cross and len(grid_shape) < 2:
    raise ValueError(f"cross_scan needs a grid of at least 2 axes, got "
                     f"grid_shape {tuple(grid_shape)}")


def scan_permutation(grid_shape, order: str) -> np.ndarray:
  """Token indices of the rows direction, in scan order (the definition).

  Rows of all leading axes (e.g. frames) count as one sequence of rows.
  """
  check_scan(grid_shape, order, cross=False)
  idx = np.arange(math.prod(grid_shape)).reshape(-1, grid_shape[-1])
  if order == "zigzag":
    idx[1::2] = idx[1::2, ::-1]
  return idx.reshape(-1)


def num_directions(cross: bool, bidirectional: bool) -> int:
  return (2 if cross else 1) * (2 if bidirectional else 1)


def _in_order(x, grid_shape, order):
  """(B, L, C) row-major tokens -> the order's sequence; an involution."""
  if order == "raster":
    return x
  b, _, c = x.shape
  rows = x.reshape(b, -1, grid_shape[-1], c)
  odd = (np.arange(rows.shape[1]) % 2 == 1)[None, :, None, None]
  return jnp.where(odd, rows[:, :, ::-1], rows).reshape(x.shape)


def _transposed(grid_shape):
  return (*grid_shape[:-2], grid_shape[-1], grid_shape[-2])


def _transpose_grid(x, grid_shape):
  """Row-major tokens of (..., H, W) -> row-major tokens of (..., W, H)."""
  b, _, c = x.shape
  x = jnp.swapaxes(x.reshape(b, *grid_shape, c), -2, -3)
  return x.reshape(b, -1, c)


def split_directions(x, grid_shape, order: str, *, cross: bool,
                     bidirectional: bool):
  """(B, L, C) row-major tokens -> (B, L, K, C), direction k's sequence."""
  grid_shape = tuple(grid_shape)
  check_scan(grid_shape, order, cross)
  seqs = [_in_order(x, grid_shape, order)]
  if cross:
    seqs.append(_in_order(_transpose_grid(x, grid_shape),
                          _transposed(grid_shape), order))
  if bidirectional:
    seqs += [s[:, ::-1] for s in seqs]
  return jnp.stack(seqs, axis=2)


def merge_directions(y, grid_shape, order: str, *, cross: bool,
                     bidirectional: bool):
  """(B, L, K, C) per-direction outputs -> (B, L, C) row-major, summed.

  The transpose of `split_directions`: token i of the result sums what
  every direction produced at the sequence position of token i.
  """
  grid_shape = tuple(grid_shape)
  check_scan(grid_shape, order, cross)
  seqs = [y[:, :, k] for k in range(y.shape[2])]
  if bidirectional:  # reversed directions follow their forward ones
    half = len(seqs) // 2
    seqs = [f + r[:, ::-1] for f, r in zip(seqs[:half], seqs[half:])]
  out = _in_order(seqs[0], grid_shape, order)
  if cross:
    columns = _transposed(grid_shape)
    out = out + _transpose_grid(_in_order(seqs[1], columns, order), columns)
  return out
