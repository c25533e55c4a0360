"""Triton (Pallas GPU) kernels for causal linear attention.

One program per (B, head) sweeps the sequence in chunks (BlockSizes.chunk
rows): inside a chunk, masked quadratic attention; across chunks, the running
state (S, z) in f32 loop carries (Triton has no scratch). The backward is one
kernel: a forward sweep for dq (rebuilding the prefix state) and a reverse
sweep (manual reversed index; Triton has no reverse scan) for dk, dv carrying
(dS, dz). The forward saves the f32 denominators for it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import linear_attention_gpu as lgpu
from pallas_kernels import linear_attention_tiles as tiles

F32 = jnp.float32


def _den_spec(rows):
  return pl.BlockSpec((None, None, rows, 1), lambda b, h: (b, h, 0, 0))


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, den_ref, *, n, d, dv, t, eps, fm,
                cd):
  dp, dvp = q_ref.shape[-1], v_ref.shape[-1]

  def body(c, carry):
    s, z = carry
    row0 = pl.multiple_of(c * t, t)
    valid = tiles.valid_mask((t, dp), row0, n, d)
    qf = tiles.features(lgpu.load_rows(q_ref, row0, t, row0, n, d), valid, fm)
    kf = tiles.features(lgpu.load_rows(k_ref, row0, t, row0, n, d), valid, fm)
    v = lgpu.load_rows(v_ref, row0, t, row0, n, dv)
    o, den, s, z = tiles.causal_fwd_chunk(qf, kf, v, s, z, eps, cd)
    lgpu.store_rows(o_ref, row0, o, row0, n, dv)
    lgpu.store_rows(den_ref, row0, den, row0, n, 1)
    return s, z

  lax.fori_loop(0, pl.cdiv(n, t), body, (jnp.zeros((dp, dvp), F32),
                                         jnp.zeros((1, dp), F32)))


def causal_forward(q, k, v, *, fm, eps, bs, interpret):
  """Returns (out, den) with den (B, H, N, 1) f32, the saved denominators."""
  b, n, h, d = q.shape
  dv = v.shape[-1]
  dp, dvp, params = lgpu.config(d, dv, bs)
  t = bs.chunk
  rows = pl.cdiv(n, t) * t
  return pl.pallas_call(
      functools.partial(_fwd_kernel, n=n, d=d, dv=dv, t=t, eps=eps, fm=fm,
                        cd=lgpu.mma_dtype(q.dtype)),
      out_shape=[jax.ShapeDtypeStruct((b, n, h, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, n, 1), F32)],
      grid=(b, h),
      in_specs=[lgpu.rows_spec(rows, dp), lgpu.rows_spec(rows, dp),
                lgpu.rows_spec(rows, dvp)],
      out_specs=[lgpu.rows_spec(rows, dvp), _den_spec(rows)],
      compiler_params=params, interpret=interpret,
      name="causal_linear_attention_fwd")(q, k, v)


def _bwd_kernel(q_ref, k_ref, v_ref, o_ref, den_ref, g_ref, dq_ref, dk_ref,
                dv_ref, *, n, d, dv, t, fm, cd):
  dp, dvp = q_ref.shape[-1], v_ref.shape[-1]
  nc = pl.cdiv(n, t)

  def load_chunk(row0):
    valid = tiles.valid_mask((t, dp), row0, n, d)
    q = lgpu.load_rows(q_ref, row0, t, row0, n, d)
    k = lgpu.load_rows(k_ref, row0, t, row0, n, d)
    rest = [lgpu.load_rows(r, row0, t, row0, n, dv)
            for r in (v_ref, o_ref, g_ref)]
    den = lgpu.load_rows(den_ref, row0, t, row0, n, 1)
    # Masked loads give den = 0 on padded rows; keep 0 / den = 0 there.
    den = jnp.where(den > 0, den, 1.0)
    return (q, tiles.features(q, valid, fm), k, tiles.features(k, valid, fm),
            *rest, den)

  def dq_body(c, carry):
    s, z = carry
    row0 = pl.multiple_of(c * t, t)
    q, qf, _, kf, v, o, g, den = load_chunk(row0)
    dq, s, z = tiles.causal_dq_chunk(q, qf, kf, v, g, o, den, s, z, fm, cd)
    lgpu.store_rows(dq_ref, row0, dq, row0, n, d)
    return s, z

  zeros = (jnp.zeros((dp, dvp), F32), jnp.zeros((1, dp), F32))
  lax.fori_loop(0, nc, dq_body, zeros)

  def dkv_body(i, carry):
    ds, dz = carry
    row0 = pl.multiple_of((nc - 1 - i) * t, t)
    _, qf, k, kf, v, o, g, den = load_chunk(row0)
    dk, dvv, ds, dz = tiles.causal_dkv_chunk(k, kf, qf, v, g, o, den, ds, dz,
                                             fm, cd)
    lgpu.store_rows(dk_ref, row0, dk, row0, n, d)
    lgpu.store_rows(dv_ref, row0, dvv, row0, n, dv)
    return ds, dz

  lax.fori_loop(0, nc, dkv_body, zeros)


def causal_backward(q, k, v, o, den, g, *, fm, bs, interpret):
  b, n, h, d = q.shape
  dv = v.shape[-1]
  dp, dvp, params = lgpu.config(d, dv, bs)
  t = bs.chunk
  rows = pl.cdiv(n, t) * t
  spec_d, spec_v = lgpu.rows_spec(rows, dp), lgpu.rows_spec(rows, dvp)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, n=n, d=d, dv=dv, t=t, fm=fm,
                        cd=lgpu.mma_dtype(q.dtype)),
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
      grid=(b, h),
      in_specs=[spec_d, spec_d, spec_v, spec_v, _den_spec(rows), spec_v],
      out_specs=[spec_d, spec_d, spec_v], compiler_params=params,
      interpret=interpret, name="causal_linear_attention_bwd")(
          q, k, v, o, den, g)
