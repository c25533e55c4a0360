"""Triton (Pallas GPU) kernels for linear attention, native (B, N, H, d) layout.

Triton rules that shape this file (notes/kernels.md §2): every value needs a
power-of-two element count, so head dims are padded to a power of two inside
the kernel with masked loads/stores (blocks overhang the array, as in jax's
ops/gpu/attention.py) and N is covered by masked tiles; no scratch, so
reductions carry their f32 accumulators through `fori_loop`; dots are 2D.
The same kernels run in interpret mode on CPU (what impl="pallas" means there).

Non-causal: `_reduce` writes per-split partial (S, z) (splits add grid
parallelism when B * heads is small; XLA sums them), `_out` is fully parallel
over (groups of N tiles, B, heads), each program loading the state once for
its group. Backward: `_bwd_q` (dq plus the (dS, dz) reduction) and `_bwd_kv`
(parallel dk, dv).
Causal: one program per (B, head) sweeps chunks carrying (S, z) in f32;
the backward sweeps forward for dq and then in reverse for dk, dv.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _backend
from pallas_kernels import linear_attention_tiles as tiles

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile rows (powers of two, >= 16) and split control for the GPU kernels.

  Attributes:
    block_n: rows per tile of the non-causal kernels.
    chunk: rows per chunk of the causal kernels.
    target_programs: the non-causal reductions split N until B * heads *
      splits reaches this (more programs hide memory latency) ...
    min_split_rows: ... but never below this many rows per split, since each
      split writes a partial state XLA must add up.
    tiles_per_program: row tiles each program of the parallel (output,
      dk/dv) kernels loops over, loading the (d, dv) state once for all.
    num_warps: Triton warps; None: 4 for padded head dims <= 64, else 8.
    num_stages: Triton software-pipelining stages.

  Causal chunks above 64 overflow shared memory in the backward at padded
  head dim 128 on H100 (seen: 321 KiB asked, 227 KiB there).
  """
  block_n: int = 64
  chunk: int = 64
  target_programs: int = 256
  min_split_rows: int = 1024
  tiles_per_program: int = 4
  num_warps: int | None = None
  num_stages: int = 2

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()


def config(d, dv, bs):
  dp, dvp = pl.next_power_of_2(max(d, 16)), pl.next_power_of_2(max(dv, 16))
  warps = bs.num_warps or (4 if max(dp, dvp) <= 64 else 8)
  params = _backend.gpu_params(num_warps=warps, num_stages=bs.num_stages)
  return dp, dvp, params


def mma_dtype(dtype):
  # 16-bit inputs feed the MMAs in their own dtype (f32 accumulation).
  return dtype if jnp.dtype(dtype).itemsize == 2 else F32


def load_rows(ref, start, t, row0, n_rows, n_cols):
  """Masked (t, padded-cols) load of rows [start, start + t) of a ref."""
  shape = (t, ref.shape[-1])
  mask = tiles.valid_mask(shape, row0, n_rows, n_cols)
  return plgpu.load(ref.at[pl.ds(start, t), :], mask=mask, other=0.0)


def store_rows(ref, start, val, row0, n_rows, n_cols):
  mask = tiles.valid_mask(val.shape, row0, n_rows, n_cols)
  plgpu.store(ref.at[pl.ds(start, val.shape[0]), :], val.astype(ref.dtype),
              mask=mask)


def _num_splits(b, h, nt, bs, t):
  want = pl.cdiv(bs.target_programs, b * h)
  return max(1, min(want, nt, pl.cdiv(nt * t, bs.min_split_rows)))


def _split_range(nt, splits):
  per = pl.cdiv(nt, splits)
  lo = pl.program_id(2) * per
  return lo, jnp.minimum(lo + per, nt)


# Specs: (B, N, H, d) arrays seen as (rows, padded d) per (b, h).
def rows_spec(rows, dp, parallel=False):
  """Whole-sequence block; grid (B, H, splits) or, parallel, (j, B, H)."""
  if parallel:
    return pl.BlockSpec((None, rows, None, dp), lambda j, b, h: (b, 0, h, 0))
  return pl.BlockSpec((None, rows, None, dp), lambda b, h, *_: (b, 0, h, 0))


def _program_tiles(nt, tpp):
  """Tile range [lo, hi) of this program of a parallel kernel."""
  lo = pl.program_id(0) * tpp
  return lo, jnp.minimum(lo + tpp, nt)


def _state_specs(dp, dvp, split):
  if split:
    return (pl.BlockSpec((None, None, None, dp, dvp),
                         lambda b, h, p: (b, h, p, 0, 0)),
            pl.BlockSpec((None, None, None, 1, dp),
                         lambda b, h, p: (b, h, p, 0, 0)))
  return (pl.BlockSpec((None, None, dp, dvp), lambda t, b, h: (b, h, 0, 0)),
          pl.BlockSpec((None, None, 1, dp), lambda t, b, h: (b, h, 0, 0)))


def _partial_state_shapes(b, h, p, d, dv):
  return (jax.ShapeDtypeStruct((b, h, p, d, dv), F32),
          jax.ShapeDtypeStruct((b, h, p, 1, d), F32))


# Non-causal forward ----------------------------------------------------------


def _reduce_kernel(k_ref, v_ref, s_ref, z_ref, *, n, d, dv, t, splits, fm, cd):
  nt = pl.cdiv(n, t)
  lo, hi = _split_range(nt, splits)
  dp, dvp = k_ref.shape[-1], v_ref.shape[-1]

  def body(i, carry):
    s, z = carry
    row0 = pl.multiple_of(i * t, t)
    kf = tiles.features(load_rows(k_ref, row0, t, row0, n, d),
                        tiles.valid_mask((t, dp), row0, n, d), fm)
    ds, dz = tiles.reduce_tile(kf, load_rows(v_ref, row0, t, row0, n, dv), cd)
    return s + ds, z + dz

  s, z = lax.fori_loop(lo, hi, body, (jnp.zeros((dp, dvp), F32),
                                      jnp.zeros((1, dp), F32)))
  store_rows(s_ref, 0, s, 0, d, dv)
  store_rows(z_ref, 0, z, 0, 1, d)


def _out_kernel(q_ref, s_ref, z_ref, o_ref, *, n, d, dv, t, tpp, eps, fm, cd):
  dp = q_ref.shape[-1]
  # The state is loaded (and cast) once for all of this program's tiles.
  s = load_rows(s_ref, 0, dp, 0, d, dv).astype(cd)
  z = load_rows(z_ref, 0, 1, 0, 1, d)

  def body(i, carry):
    row0 = pl.multiple_of(i * t, t)
    qf = tiles.features(load_rows(q_ref, row0, t, row0, n, d),
                        tiles.valid_mask((t, dp), row0, n, d), fm)
    o, _ = tiles.out_tile(qf, s, z, eps, cd)
    store_rows(o_ref, row0, o, row0, n, dv)
    return carry

  lax.fori_loop(*_program_tiles(pl.cdiv(n, t), tpp), body, 0)


def nc_forward(q, k, v, *, fm, eps, bs, interpret):
  """Non-causal forward; returns (out, (S, z)) with S (B, H, d, dv) f32."""
  b, n, h, d = q.shape
  dv = v.shape[-1]
  dp, dvp, params = config(d, dv, bs)
  cd = mma_dtype(q.dtype)
  t = bs.block_n
  nt = pl.cdiv(n, t)
  splits = _num_splits(b, h, nt, bs, t)
  s, z = pl.pallas_call(
      functools.partial(_reduce_kernel, n=n, d=d, dv=dv, t=t, splits=splits,
                        fm=fm, cd=cd),
      out_shape=_partial_state_shapes(b, h, splits, d, dv),
      grid=(b, h, splits),
      in_specs=[rows_spec(nt * t, dp), rows_spec(nt * t, dvp)],
      out_specs=_state_specs(dp, dvp, True), compiler_params=params,
      interpret=interpret, name="linear_attention_reduce")(k, v)
  # Adding the per-split partial states is tiny next to reading k and v.
  s, z = s.sum(2), z.sum(2)
  s_spec, z_spec = _state_specs(dp, dvp, False)
  tpp = bs.tiles_per_program
  out = pl.pallas_call(
      functools.partial(_out_kernel, n=n, d=d, dv=dv, t=t, tpp=tpp, eps=eps,
                        fm=fm, cd=cd),
      out_shape=jax.ShapeDtypeStruct((b, n, h, dv), q.dtype),
      grid=(pl.cdiv(nt, tpp), b, h),
      in_specs=[rows_spec(nt * t, dp, True), s_spec, z_spec],
      out_specs=rows_spec(nt * t, dvp, True), compiler_params=params,
      interpret=interpret, name="linear_attention_out")(q, s, z)
  return out, (s, z)


# Non-causal backward ---------------------------------------------------------


def _bwd_q_kernel(q_ref, g_ref, s_ref, z_ref, ds_ref, dz_ref, dq_ref, *, n, d,
                  dv, t, splits, eps, fm, cd):
  nt = pl.cdiv(n, t)
  lo, hi = _split_range(nt, splits)
  dp, dvp = q_ref.shape[-1], g_ref.shape[-1]
  s = load_rows(s_ref, 0, dp, 0, d, dv)
  z = load_rows(z_ref, 0, 1, 0, 1, d)

  def body(i, carry):
    ds, dz = carry
    row0 = pl.multiple_of(i * t, t)
    q = load_rows(q_ref, row0, t, row0, n, d)
    qf = tiles.features(q, tiles.valid_mask((t, dp), row0, n, d), fm)
    g = load_rows(g_ref, row0, t, row0, n, dv)
    dq, ds_i, dz_i = tiles.bwd_q_tile(q, qf, g, s, z, eps, fm, cd)
    store_rows(dq_ref, row0, dq, row0, n, d)
    return ds + ds_i, dz + dz_i

  ds, dz = lax.fori_loop(lo, hi, body, (jnp.zeros((dp, dvp), F32),
                                        jnp.zeros((1, dp), F32)))
  store_rows(ds_ref, 0, ds, 0, d, dv)
  store_rows(dz_ref, 0, dz, 0, 1, d)


def _bwd_kv_kernel(k_ref, v_ref, ds_ref, dz_ref, dk_ref, dv_ref, *, n, d, dv,
                   t, tpp, fm, cd):
  dp = k_ref.shape[-1]
  ds = load_rows(ds_ref, 0, dp, 0, d, dv).astype(cd)
  dz = load_rows(dz_ref, 0, 1, 0, 1, d)

  def body(i, carry):
    row0 = pl.multiple_of(i * t, t)
    k = load_rows(k_ref, row0, t, row0, n, d)
    kf = tiles.features(k, tiles.valid_mask((t, dp), row0, n, d), fm)
    v = load_rows(v_ref, row0, t, row0, n, dv)
    dk, dvv = tiles.bwd_kv_tile(k, kf, v, ds, dz, fm, cd)
    store_rows(dk_ref, row0, dk, row0, n, d)
    store_rows(dv_ref, row0, dvv, row0, n, dv)
    return carry

  lax.fori_loop(*_program_tiles(pl.cdiv(n, t), tpp), body, 0)


def nc_backward(q, k, v, s, z, g, *, fm, eps, bs, interpret):
  b, n, h, d = q.shape
  dv = v.shape[-1]
  dp, dvp, params = config(d, dv, bs)
  cd = mma_dtype(q.dtype)
  t = bs.block_n
  nt = pl.cdiv(n, t)
  splits = _num_splits(b, h, nt, bs, t)
  s_spec = pl.BlockSpec((None, None, dp, dvp), lambda b_, h_, p: (b_, h_, 0, 0))
  z_spec = pl.BlockSpec((None, None, 1, dp), lambda b_, h_, p: (b_, h_, 0, 0))
  ds_p, dz_p, dq = pl.pallas_call(
      functools.partial(_bwd_q_kernel, n=n, d=d, dv=dv, t=t, splits=splits,
                        eps=eps, fm=fm, cd=cd),
      out_shape=list(_partial_state_shapes(b, h, splits, d, dv))
      + [jax.ShapeDtypeStruct(q.shape, q.dtype)],
      grid=(b, h, splits),
      in_specs=[rows_spec(nt * t, dp), rows_spec(nt * t, dvp), s_spec,
                z_spec],
      out_specs=list(_state_specs(dp, dvp, True)) + [rows_spec(nt * t, dp)],
      compiler_params=params, interpret=interpret,
      name="linear_attention_bwd_q")(q, g, s, z)
  ds, dz = ds_p.sum(2), dz_p.sum(2)
  s_spec, z_spec = _state_specs(dp, dvp, False)
  tpp = bs.tiles_per_program
  spec_d, spec_v = rows_spec(nt * t, dp, True), rows_spec(nt * t, dvp, True)
  dk, dvv = pl.pallas_call(
      functools.partial(_bwd_kv_kernel, n=n, d=d, dv=dv, t=t, tpp=tpp, fm=fm,
                        cd=cd),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(pl.cdiv(nt, tpp), b, h),
      in_specs=[spec_d, spec_v, s_spec, z_spec],
      out_specs=[spec_d, spec_v],
      compiler_params=params, interpret=interpret,
      name="linear_attention_bwd_kv")(k, v, ds, dz)
  return dq, dk, dvv
