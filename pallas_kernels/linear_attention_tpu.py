"""Mosaic (Pallas TPU) kernels for linear attention.

Mosaic wants (8, 128)-aligned blocks, so the wrapper moves heads in front
((B, N, H, d) -> (B, H, N, d)) and zero-pads N to the tile and d to a lane
multiple; the padding is masked out of phi inside the kernels. Reductions run
along an "arbitrary" grid axis: the non-causal state accumulates in its
output block (resident across that axis), the causal state in VMEM scratch.
The causal dk/dv sweep walks the chunks in reverse through its index_map.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _backend
from pallas_kernels import linear_attention_tiles as tiles

F32 = jnp.float32
TILE = 128  # rows per tile / chunk; >= 128 keeps the MXU busy
LANES = 128


def _cd(dtype):
  return dtype if jnp.dtype(dtype).itemsize == 2 else F32


def _to_kernel_layout(x, rows):
  """(B, N, H, d) -> (B, H, rows, d padded to lanes), zero padded."""
  n, d = x.shape[1], x.shape[3]
  dp = pl.cdiv(d, LANES) * LANES
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, rows - n), (0, dp - d)))


def _from_kernel_layout(x, n, d):
  return jnp.swapaxes(x[:, :, :n, :d], 1, 2)


def _tile_spec(dp, reverse_nt=None):
  if reverse_nt is None:
    return pl.BlockSpec((None, None, TILE, dp), lambda b, h, t: (b, h, t, 0))
  return pl.BlockSpec((None, None, TILE, dp),
                      lambda b, h, t: (b, h, reverse_nt - 1 - t, 0))


def _whole_spec(r, c):
  return pl.BlockSpec((None, None, r, c), lambda b, h, t: (b, h, 0, 0))


def _call(kernel, out_shape, grid, in_specs, out_specs, semantics, name,
          scratch=(), *, interpret):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch,
      compiler_params=_backend.tpu_params(*semantics), interpret=interpret,
      name=name)


def _feat(x, row0, n, d, fm):
  return tiles.features(x, tiles.valid_mask(x.shape, row0, n, d), fm)


# Non-causal ------------------------------------------------------------------


def _reduce_kernel(k_ref, v_ref, s_ref, z_ref, *, n, d, fm, cd):
  t = pl.program_id(2)

  @pl.when(t == 0)
  def _():
    s_ref[...] = jnp.zeros_like(s_ref)
    z_ref[...] = jnp.zeros_like(z_ref)

  kf = _feat(k_ref[...], t * TILE, n, d, fm)
  ds, dz = tiles.reduce_tile(kf, v_ref[...], cd)
  s_ref[...] += ds
  z_ref[...] += dz


def _out_kernel(q_ref, s_ref, z_ref, o_ref, *, n, d, eps, fm, cd):
  qf = _feat(q_ref[...], pl.program_id(2) * TILE, n, d, fm)
  o, _ = tiles.out_tile(qf, s_ref[...], z_ref[...], eps, cd)
  o_ref[...] = o.astype(o_ref.dtype)


def _bwd_q_kernel(q_ref, g_ref, s_ref, z_ref, dq_ref, ds_ref, dz_ref, *, n, d,
                  eps, fm, cd):
  t = pl.program_id(2)

  @pl.when(t == 0)
  def _():
    ds_ref[...] = jnp.zeros_like(ds_ref)
    dz_ref[...] = jnp.zeros_like(dz_ref)

  q = q_ref[...]
  dq, ds, dz = tiles.bwd_q_tile(q, _feat(q, t * TILE, n, d, fm), g_ref[...],
                                s_ref[...], z_ref[...], eps, fm, cd)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  ds_ref[...] += ds
  dz_ref[...] += dz


def _bwd_kv_kernel(k_ref, v_ref, ds_ref, dz_ref, dk_ref, dv_ref, *, n, d, fm,
                   cd):
  k = k_ref[...]
  dk, dv = tiles.bwd_kv_tile(k, _feat(k, pl.program_id(2) * TILE, n, d, fm),
                             v_ref[...], ds_ref[...], dz_ref[...], fm, cd)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# Causal ----------------------------------------------------------------------


def _zero_scratch_at_start(*refs):
  @pl.when(pl.program_id(2) == 0)
  def _():
    for r in refs:
      r[...] = jnp.zeros_like(r)


def _causal_fwd_kernel(q_ref, k_ref, v_ref, o_ref, den_ref, s_ref, z_ref, *,
                       n, d, eps, fm, cd):
  _zero_scratch_at_start(s_ref, z_ref)
  row0 = pl.program_id(2) * TILE
  o, den, s_ref[...], z_ref[...] = tiles.causal_fwd_chunk(
      _feat(q_ref[...], row0, n, d, fm), _feat(k_ref[...], row0, n, d, fm),
      v_ref[...], s_ref[...], z_ref[...], eps, cd)
  o_ref[...] = o.astype(o_ref.dtype)
  den_ref[...] = den


def _causal_dq_kernel(q_ref, k_ref, v_ref, o_ref, den_ref, g_ref, dq_ref,
                      s_ref, z_ref, *, n, d, fm, cd):
  _zero_scratch_at_start(s_ref, z_ref)
  row0 = pl.program_id(2) * TILE
  q = q_ref[...]
  dq, s_ref[...], z_ref[...] = tiles.causal_dq_chunk(
      q, _feat(q, row0, n, d, fm), _feat(k_ref[...], row0, n, d, fm),
      v_ref[...], g_ref[...], o_ref[...], den_ref[...], s_ref[...],
      z_ref[...], fm, cd)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _causal_dkv_kernel(q_ref, k_ref, v_ref, o_ref, den_ref, g_ref, dk_ref,
                       dv_ref, ds_ref, dz_ref, *, n, d, nt, fm, cd):
  _zero_scratch_at_start(ds_ref, dz_ref)
  row0 = (nt - 1 - pl.program_id(2)) * TILE
  k = k_ref[...]
  dk, dv, ds_ref[...], dz_ref[...] = tiles.causal_dkv_chunk(
      k, _feat(k, row0, n, d, fm), _feat(q_ref[...], row0, n, d, fm),
      v_ref[...], g_ref[...], o_ref[...], den_ref[...], ds_ref[...],
      dz_ref[...], fm, cd)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# Wrappers --------------------------------------------------------------------


def _d_marker(d):
  # Residuals are padded to lanes; this empty array carries the true head dim
  # (its static shape) to the backward.
  return jnp.zeros((0, d), F32)

_PAR = ("parallel", "parallel", "parallel")
_SEQ = ("parallel", "parallel", "arbitrary")


def forward(q, k, v, *, causal, fm, eps, interpret=False):
  """Returns (out, residuals); residuals stay in the kernel layout."""
  b, n, h, d = q.shape
  dv = v.shape[-1]
  nt = pl.cdiv(n, TILE)
  qt, kt, vt = (_to_kernel_layout(x, nt * TILE) for x in (q, k, v))
  dp, dvp = qt.shape[-1], vt.shape[-1]
  kw = dict(n=n, d=d, fm=fm, cd=_cd(q.dtype))
  grid = (b, h, nt)
  sd = lambda *s: jax.ShapeDtypeStruct(s, F32)
  if causal:
    ot, den = _call(
        functools.partial(_causal_fwd_kernel, eps=eps, **kw),
        [jax.ShapeDtypeStruct(vt.shape, q.dtype), sd(b, h, nt * TILE, 1)],
        grid, [_tile_spec(dp), _tile_spec(dp), _tile_spec(dvp)],
        [_tile_spec(dvp), _tile_spec(1)], _SEQ, "causal_linear_attention_fwd",
        [pltpu.VMEM((dp, dvp), F32), pltpu.VMEM((1, dp), F32)],
        interpret=interpret)(qt, kt, vt)
    res = (qt, kt, vt, ot, den, _d_marker(d))
    return _from_kernel_layout(ot, n, dv), res
  s, z = _call(
      functools.partial(_reduce_kernel, **kw), [sd(b, h, dp, dvp),
                                                sd(b, h, 1, dp)],
      grid, [_tile_spec(dp), _tile_spec(dvp)],
      [_whole_spec(dp, dvp), _whole_spec(1, dp)], _SEQ,
      "linear_attention_reduce", interpret=interpret)(kt, vt)
  ot = _call(
      functools.partial(_out_kernel, eps=eps, **kw),
      jax.ShapeDtypeStruct(vt.shape, q.dtype), grid,
      [_tile_spec(dp), _whole_spec(dp, dvp), _whole_spec(1, dp)],
      _tile_spec(dvp), _PAR, "linear_attention_out",
      interpret=interpret)(qt, s, z)
  return _from_kernel_layout(ot, n, dv), (qt, kt, vt, s, z, _d_marker(d))


def backward(res, g, *, causal, fm, eps, interpret=False):
  qt, kt, vt = res[:3]
  b, h, rows, dp = qt.shape
  dvp = vt.shape[-1]
  n, dv = g.shape[1], g.shape[3]
  d = res[5].shape[1]
  nt = rows // TILE
  gt = _to_kernel_layout(g, rows)
  kw = dict(n=n, d=d, fm=fm, cd=_cd(qt.dtype))
  grid = (b, h, nt)
  like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  scratch = [pltpu.VMEM((dp, dvp), F32), pltpu.VMEM((1, dp), F32)]
  if causal:
    ot, den = res[3:5]
    ins = (qt, kt, vt, ot, den, gt)
    fwd_specs = [_tile_spec(dp)] * 2 + [_tile_spec(dvp)] * 2 + [
        _tile_spec(1), _tile_spec(dvp)]
    dqt = _call(functools.partial(_causal_dq_kernel, **kw), like(qt), grid,
                fwd_specs, _tile_spec(dp), _SEQ, "causal_linear_attention_dq",
                scratch, interpret=interpret)(*ins)
    rev = [_tile_spec(x.shape[-1], nt) for x in ins]
    dkt, dvt = _call(
        functools.partial(_causal_dkv_kernel, nt=nt, **kw),
        [like(kt), like(vt)], grid, rev,
        [_tile_spec(dp, nt), _tile_spec(dvp, nt)], _SEQ,
        "causal_linear_attention_dkv", scratch, interpret=interpret)(*ins)
  else:
    s, z = res[3:5]
    sd = lambda *sh: jax.ShapeDtypeStruct(sh, F32)
    dqt, ds, dz = _call(
        functools.partial(_bwd_q_kernel, eps=eps, **kw),
        [like(qt), sd(b, h, dp, dvp), sd(b, h, 1, dp)], grid,
        [_tile_spec(dp), _tile_spec(dvp), _whole_spec(dp, dvp),
         _whole_spec(1, dp)],
        [_tile_spec(dp), _whole_spec(dp, dvp), _whole_spec(1, dp)], _SEQ,
        "linear_attention_bwd_q", interpret=interpret)(qt, gt, s, z)
    dkt, dvt = _call(
        functools.partial(_bwd_kv_kernel, **kw), [like(kt), like(vt)], grid,
        [_tile_spec(dp), _tile_spec(dvp), _whole_spec(dp, dvp),
         _whole_spec(1, dp)],
        [_tile_spec(dp), _tile_spec(dvp)], _PAR,
        "linear_attention_bwd_kv", interpret=interpret)(kt, vt, ds, dz)
  return tuple(_from_kernel_layout(x, n, w)
               for x, w in ((dqt, d), (dkt, d), (dvt, dv)))
