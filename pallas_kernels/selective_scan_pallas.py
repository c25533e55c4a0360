"""custom_vjp wrapper around the selective-scan Pallas kernels.

Pads the public channels-last arrays into the kernels' layout (see
selective_scan_kernels.py), runs the forward kernels saving chunk-boundary
states, and in the backward sums the per-program partial gradients in JAX
(deterministic; no atomics).

HBM traffic of the GPU kernels, in units of one (batch, length, dim)
sequence array in the caller's dtype (B/C, A, D and the per-segment f32
arrays are small next to these at dim >> state, except where noted):
  roof (bench/scan.py)  fwd: u, delta, z read, y written = 4;
                        fwd+bwd: 4 + (u, delta, z, dy read; du, ddelta, dz
                        written = 7) = 11.
  splits == 1           fwd 4, bwd 7: the roof. Plus the boundary states,
                        4 N / chunk bytes per element (1 B at N=16,
                        chunk=64: half a bf16 array), written and read once.
  splits == S > 1       fwd: phase 1 rereads u and delta (it needs no C, z
                        or y) for all segments but the last: 4 + 2 (S-1)/S;
                        bwd: the local pass reads delta, z, dy for all
                        segments but the first: 7 + 3 (S-1)/S. Against the
                        roof: fwd < 1.5x, fwd+bwd < 1.45x. Fusing phases 1
                        and 3 (y from a zero state, corrected afterwards)
                        would write and reread y and reread delta and C:
                        at least 7 for the forward, so it is not done.
  both                  the backward's recompute work buffer: each chunk's
                        states, 4 N bytes per element written and read once
                        (64 B at N=16, 32x a bf16 array); it stays in L2
                        only while resident programs x chunk x N x block_d
                        x 4 bytes fit, else it is the largest term.
  splits > 1, also      per-segment f32 (N, Dp) states: one such array is
                        S * N * 4 / (length * itemsize) sequence arrays
                        (bf16: 0.25 at S=32, L=4096; 0.5 at S=16, L=1024).
                        The forward writes the local states, the XLA
                        recurrence reads them and writes the initial
                        states (plus its own passes), the real pass reads
                        them: about 4 such arrays; the backward likewise,
                        plus the dA partials written and summed: about 6.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import selective_scan_calls as calls
from pallas_kernels import selective_scan_kernels as k

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tuning knobs (None: chosen per problem, see `make_config`).

  Attributes:
    block_d: channels per program on GPU (power of two); TPU always uses 128
      (the lane width).
    chunk: timesteps between saved boundary states, and the length of the
      backward's recompute window. A multiple of 8 (TPU sublanes).
    num_warps: Triton warps per program.
    num_stages: Triton pipeline stages.
    unroll: timesteps per time-loop iteration (divides chunk); lets the
      compiler issue loads of later steps while the state update runs.
    splits: GPU: time segments per sequence that run as parallel programs
      (chunk-parallel scan, see selective_scan_kernels.py); None chooses
      about _PROGRAMS_PER_SM programs per SM; 1 is one sequential program
      per (batch, channel tile). The default stays 1, the kernel measured
      on an H100, until the split kernels have run on a GPU
      (`bench/scan.py --splits 1,auto`); they pass interpret mode and the
      CUDA lowering only. Segments hold whole chunks, so the count
      used is ceil(chunks / ceil(chunks / splits)). Ignored on TPU (its
      chunk grid axis is sequential).
  """
  block_d: int | None = None
  chunk: int = 64
  num_warps: int | None = None
  num_stages: int = 1
  unroll: int = 4
  splits: int | None = 1

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


# H100 SMs: below one program per SM (and with splits == 1), halve the
# channel tile.
_MIN_PROGRAMS = 132
# Auto splits aim at this many programs per SM: one sequential program per
# SM leaves each scheduler about one warp, so every time step pays its full
# latency. Not yet tuned on a GPU (bench/scan.py --splits compares counts).
_SMS = 132
_PROGRAMS_PER_SM = 8


def _round_up(x, m):
  return -(-x // m) * m


def _prev_power_of_2(x):
  return 1 << (max(x, 1).bit_length() - 1)


def _split(nc, programs, splits):
  """(splits, chunks per split) for nc chunks, `programs` per split."""
  if splits is None:
    want = pl.cdiv(_SMS * _PROGRAMS_PER_SM, programs)
    # Power-of-two segment lengths (in chunks): no extra time padding when
    # nc is a power of two, and power-of-two blocks for Triton.
    per = _prev_power_of_2(max(1, nc // want))
  else:
    per = pl.cdiv(nc, splits)
  return pl.cdiv(nc, per), per


def make_config(backend, interpret, softplus, has_z, batch, length, dim,
                groups, block_sizes):
  """Picks the per-backend tile sizes and time splits for a problem.

  GPU default: block_d 64 with 2 warps (one thread per channel), the best
  of a sweep on an H100 at batch 8 with splits=1 (block_d 16-128, 1-4
  warps, unroll 1-8, chunk 32-128); with splits=1, block_d 32 when 64 would
  leave SMs without a program. Auto splits make batch x tiles x splits
  about _PROGRAMS_PER_SM x 132.
  """
  bs = block_sizes or BlockSizes.get_default()
  if bs.chunk % 8 or bs.chunk % bs.unroll:
    raise ValueError(f"block_sizes.chunk ({bs.chunk}) must be a multiple of "
                     f"8 and of unroll ({bs.unroll})")
  if bs.block_d is not None and bs.block_d & (bs.block_d - 1):
    raise ValueError(f"block_sizes.block_d must be a power of two, got "
                     f"{bs.block_d}")
  if bs.splits is not None and bs.splits < 1:
    raise ValueError(f"block_sizes.splits must be None or >= 1, got "
                     f"{bs.splits}")
  per_group = dim // groups
  nc = pl.cdiv(length, bs.chunk)
  if backend == "tpu":
    block_d = 128  # lane multiple; channels are padded per group to it
    splits, per = 1, nc
  else:
    block_d = min(bs.block_d or 64, pl.next_power_of_2(per_group))
    progs = lambda bd: batch * groups * pl.cdiv(per_group, bd)
    splits, per = _split(nc, progs(block_d), bs.splits)
    if bs.block_d is None and splits == 1 and progs(64) < _MIN_PROGRAMS:
      block_d = min(32, block_d)
  num_warps = bs.num_warps or max(1, block_d // 32)
  return k.Config(backend=backend, interpret=interpret, softplus=softplus,
                  has_z=has_z, block_d=block_d, chunk=bs.chunk,
                  num_warps=num_warps, num_stages=bs.num_stages,
                  unroll=bs.unroll, splits=splits, split_chunks=per)


def num_programs(cfg, batch, dim, groups):
  """Programs in each of the main (y, gradient) pallas_calls."""
  tiles = groups * _round_up(dim // groups, cfg.block_d) // cfg.block_d
  time = cfg.splits if cfg.backend == "gpu" else cfg.split_chunks
  return batch * tiles * time


class _Layout:
  """Padding between the public and the kernel layouts."""

  def __init__(self, cfg, u, B):
    self.bsz, self.length, self.dim = u.shape
    self.groups, self.state = B.shape[2:]
    self.per_group = self.dim // self.groups
    self.gp = _round_up(self.per_group, cfg.block_d)
    self.lp = cfg.splits * cfg.seg  # whole segments of whole chunks
    assert self.lp >= self.length, (self.length, cfg)
    self.np = pl.next_power_of_2(self.state)

  def seq(self, x):
    """(b, L, D) -> (b, Lp, Dp): zeros before time 0, per-group channels."""
    b, L, g = self.bsz, self.length, self.groups
    x = x.reshape(b, L, g, self.per_group)
    x = jnp.pad(x, ((0, 0), (self.lp - L, 0), (0, 0),
                    (0, self.gp - self.per_group)))
    return x.reshape(b, self.lp, g * self.gp)

  def unseq(self, x):
    x = x.reshape(self.bsz, self.lp, self.groups, self.gp)
    x = x[:, self.lp - self.length:, :, :self.per_group]
    return x.reshape(self.bsz, self.length, self.dim)

  def chan(self, x):
    """(..., D) -> (..., Dp) per-group zero padding of the channel axis."""
    lead = x.shape[:-1]
    x = x.reshape(lead + (self.groups, self.per_group))
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0),
                                            (0, self.gp - self.per_group)])
    return x.reshape(lead + (self.groups * self.gp,))

  def unchan(self, x):
    lead = x.shape[:-1]
    x = x.reshape(lead + (self.groups, self.gp))[..., :self.per_group]
    return x.reshape(lead + (self.dim,))

  def bc(self, x):
    """(b, L, G, N) -> (b, G, Lp, Np)."""
    x = jnp.transpose(x, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (self.lp - self.length, 0),
                       (0, self.np - self.state)))

  def unbc(self, x):
    """(b, G, Lp, Np) -> (b, L, G, N)."""
    x = x[:, :, self.lp - self.length:, :self.state]
    return jnp.transpose(x, (0, 2, 1, 3))

  def mat(self, a):
    """A (D, N) -> (Np, Dp) f32."""
    a = jnp.pad(a.astype(F32), ((0, 0), (0, self.np - self.state)))
    return self.chan(a.T)

  def unmat(self, a):
    return self.unchan(a)[:self.state].T


def _prepare(cfg, u, delta, A, B, C, D, z, bias):
  lay = _Layout(cfg, u, B)
  # Mosaic handles 32-bit rows most simply; the GPU kernel reads the
  # caller's dtype directly (bf16 halves its HBM traffic).
  cast = (lambda x: x.astype(F32)) if cfg.backend == "tpu" else (lambda x: x)
  args = (cast(lay.seq(u)), cast(lay.seq(delta)),
          cast(lay.seq(z)) if cfg.has_z else None, lay.mat(A),
          cast(lay.bc(B)), cast(lay.bc(C)),
          lay.chan(D.astype(F32))[None], lay.chan(bias.astype(F32))[None])
  return lay, args


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan(cfg, u, delta, A, B, C, D, z, bias):
  """Returns (y (b, L, D) in u.dtype, last state (b, D, N) f32)."""
  out, _ = _scan_fwd(cfg, u, delta, A, B, C, D, z, bias)
  return out


def _scan_fwd(cfg, u, delta, A, B, C, D, z, bias):
  lay, args = _prepare(cfg, u, delta, A, B, C, D, z, bias)
  y, last, states = calls.forward(cfg, *args)
  y = lay.unseq(y).astype(u.dtype)
  last = jnp.swapaxes(lay.unchan(last)[:, :lay.state], 1, 2)
  return (y, last), (u, delta, A, B, C, D, z, bias, states)


def _scan_bwd(cfg, res, cts):
  *inputs, states = res
  u, delta, A, B, C, D, z, bias = inputs
  dy, dlast = cts
  lay, args = _prepare(cfg, *inputs)
  dy = lay.seq(dy.astype(u.dtype))
  if cfg.backend == "tpu":
    dy = dy.astype(F32)
  dlast = lay.chan(jnp.pad(jnp.swapaxes(dlast.astype(F32), 1, 2),
                           ((0, 0), (0, lay.np - lay.state), (0, 0))))
  du, ddelta, dz, da, dd, db, dbp, dcp = calls.backward(
      cfg, *args, states, dy, dlast)
  # Deterministic reductions of the per-program partials: the channel tiles
  # of each group hold partial dB/dC; batches and segments hold partial
  # dA/dD/dbias.
  tpg = lay.gp // cfg.block_d
  split = (lay.bsz, lay.groups, tpg, lay.lp, lay.np)
  dbp = lay.unbc(dbp.reshape(split).sum(axis=2)).astype(B.dtype)
  dcp = lay.unbc(dcp.reshape(split).sum(axis=2)).astype(C.dtype)
  return (lay.unseq(du).astype(u.dtype),
          lay.unseq(ddelta).astype(delta.dtype),
          lay.unmat(da.sum(axis=(0, 1))).astype(A.dtype),
          dbp, dcp,
          lay.unchan(dd.sum(axis=(0, 1, 2))).astype(D.dtype),
          None if z is None else lay.unseq(dz).astype(z.dtype),
          lay.unchan(db.sum(axis=(0, 1, 2))).astype(bias.dtype))


scan.defvjp(_scan_fwd, _scan_bwd)
