"""Pallas kernels for local attention: Triton (GPU) and Mosaic (TPU).

Inputs are in tile order, (B, heads, Np, Dp) with Np whole tiles and Dp a
power of two (GPU) or a multiple of 128 (TPU), see local_attention_geometry.
Softmax runs in base 2: logits are scaled by scale * log2(e) and the saved
logsumexp `lse` is base 2 too.

GPU (Triton: no scratch, no scalar prefetch): one program per (query block,
batch, head) loops over the key blocks of its table row with `fori_loop`,
reading table entries and K/V tiles by ref indexing; accumulators are loop
carries. TPU: the visited blocks are the last grid axis ("arbitrary"), the
tables are scalar-prefetched into SMEM and drive the K/V index maps (as splash
attention does), accumulators live in VMEM scratch.

Backward as FlashAttention-2: delta = rowsum(dO * O) (in the caller), then a
dK/dV kernel over key blocks visiting the transposed table and a dQ kernel
over query blocks; no atomics.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels.local_attention_geometry import (MASK_VALUE, BlockTable,
                                                     Geometry, block_table,
                                                     window_mask)

LOG2E = math.log2(math.e)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T without materialising b.T


@dataclasses.dataclass(frozen=True)
class Config:
  """Static configuration of one kernel instance (hashable: a vjp arg)."""
  geo: Geometry
  head_dim: int  # padded feature size
  scale: float
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  backend: str  # "gpu" or "tpu"
  interpret: bool = False
  num_warps: int = 4
  num_stages: int = 2
  poison: bool = False  # tests: outputs start as NaN (aliased inputs)

  def table(self, bwd: bool = False, transpose: bool = False) -> BlockTable:
    bq, bk = ((self.block_q_bwd, self.block_k_bwd) if bwd
              else (self.block_q, self.block_k))
    return _cached_table(self.geo, bq, bk, transpose)

  def params(self, *semantics):
    if self.interpret:
      return None
    if self.backend == "gpu":
      return _backend.gpu_params(self.num_warps, self.num_stages)
    return _backend.tpu_params(*semantics)


@functools.lru_cache(maxsize=64)
def _cached_table(geo, bq, bk, transpose):
  return block_table(geo, bq, bk, transpose)


def _tables(cfg: Config, bq: int, bk: int, table: BlockTable, rows_are_q):
  """Flat int32 operands: index, counts, row-block and col-block bases."""
  qbase = cfg.geo.block_base(bq).reshape(-1)
  kbase = cfg.geo.block_base(bk).reshape(-1)
  counts = jnp.stack([table.num_masked, table.num_total], -1).reshape(-1)
  rows, cols = (qbase, kbase) if rows_are_q else (kbase, qbase)
  return [jnp.asarray(table.index.reshape(-1)), counts.astype(jnp.int32),
          jnp.asarray(rows), jnp.asarray(cols)]


def _bases(cfg, base_ref, block):
  return [base_ref[block * cfg.geo.ndim + a] for a in range(cfg.geo.ndim)]


# Steps shared by both backends. Row statistics are (rows, 1) columns, or
# (1, cols) rows in the dK/dV step, which works on transposed logits.


def _fwd_step(q, k, v, carry, mask, c):
  m, l, acc = carry
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * c
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new)
  l = l * alpha + jnp.sum(p, axis=1, keepdims=True)
  acc = acc * alpha + jnp.dot(p.astype(v.dtype), v,
                              preferred_element_type=jnp.float32)
  return m_new, l, acc


def _fwd_finish(m, l, acc):
  # Rows that saw no key at all (pure grid padding) have l == 0.
  l = jnp.where(l == 0.0, 1.0, l)
  return acc / l, m + jnp.log2(l)


def _dkdv_step(k, v, q, do, lse_row, delta_row, carry, mask, c):
  dk, dv = carry
  pt = jnp.exp2(lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32)
                * c - lse_row)
  if mask is not None:  # after exp2: masked logits may overflow, `where` wins
    pt = jnp.where(mask, pt, 0.0)
  dv = dv + jnp.dot(pt.astype(do.dtype), do,
                    preferred_element_type=jnp.float32)
  dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
  dst = pt * (dpt - delta_row)
  dk = dk + jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dk, dv


def _dq_step(q, do, k, v, lse_col, delta_col, dq, mask, c):
  p = jnp.exp2(lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
               * c - lse_col)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
  ds = p * (dp - delta_col)
  return dq + jnp.dot(ds.astype(k.dtype), k,
                      preferred_element_type=jnp.float32)


def _loop(cfg, i, cnt_ref, body, init):
  """Runs body over the masked then the unmasked entries of table row i."""
  n_masked, n_total = cnt_ref[2 * i], cnt_ref[2 * i + 1]
  carry = lax.fori_loop(0, n_masked, functools.partial(body, masked=True),
                        init)
  return lax.fori_loop(n_masked, n_total,
                       functools.partial(body, masked=False), carry)


# ----------------------------------------------------------------- GPU ------


def _gpu_fwd_kernel(idx_ref, cnt_ref, qb_ref, kb_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, cfg: Config, width: int):
  bq, bk, dp = cfg.block_q, cfg.block_k, cfg.head_dim
  i = pl.program_id(0)
  q = q_ref[...]
  q_base = _bases(cfg, qb_ref, i)
  c = cfg.scale * LOG2E

  def body(j, carry, masked):
    kb = idx_ref[i * width + j]
    rows = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    mask = window_mask(cfg.geo, q_base, _bases(cfg, kb_ref, kb), bq,
                       bk) if masked else None
    return _fwd_step(q, k_ref[rows, :], v_ref[rows, :], carry, mask, c)

  init = (jnp.full((bq, 1), MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32), jnp.zeros((bq, dp), jnp.float32))
  o, lse = _fwd_finish(*_loop(cfg, i, cnt_ref, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(bq)


def _gpu_dkdv_kernel(idx_ref, cnt_ref, kb_ref, qb_ref, q_ref, k_ref, v_ref,
                     do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                     cfg: Config, width: int):
  bq, bk, dp = cfg.block_q_bwd, cfg.block_k_bwd, cfg.head_dim
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_base = _bases(cfg, kb_ref, j)
  c = cfg.scale * LOG2E

  def body(t, carry, masked):
    qi = idx_ref[j * width + t]
    rows = pl.ds(pl.multiple_of(qi * bq, bq), bq)
    mask = window_mask(cfg.geo, _bases(cfg, qb_ref, qi), k_base, bq, bk,
                       keys_on_rows=True) if masked else None
    return _dkdv_step(k, v, q_ref[rows, :], do_ref[rows, :],
                      lse_ref[rows][None, :], delta_ref[rows][None, :],
                      carry, mask, c)

  init = (jnp.zeros((bk, dp), jnp.float32), jnp.zeros((bk, dp), jnp.float32))
  dk, dv = _loop(cfg, j, cnt_ref, body, init)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_dq_kernel(idx_ref, cnt_ref, qb_ref, kb_ref, q_ref, k_ref, v_ref,
                   do_ref, lse_ref, delta_ref, dq_ref, *, cfg: Config,
                   width: int):
  bq, bk, dp = cfg.block_q_bwd, cfg.block_k_bwd, cfg.head_dim
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_base = _bases(cfg, qb_ref, i)
  c = cfg.scale * LOG2E

  def body(j, dq, masked):
    kb = idx_ref[i * width + j]
    rows = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    mask = window_mask(cfg.geo, q_base, _bases(cfg, kb_ref, kb), bq,
                       bk) if masked else None
    return _dq_step(q, do, k_ref[rows, :], v_ref[rows, :], lse, delta, dq,
                    mask, c)

  dq = _loop(cfg, i, cnt_ref, body, jnp.zeros((bq, dp), jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def poisoned_call(kernel, cfg: Config, args, out_shape, **kwargs):
  """Named pallas_call; with cfg.poison every output starts as NaN.

  The NaN buffers are extra inputs aliased to the outputs, so a test proves
  each output element is written. With a `grid_spec` the caller must already
  have appended the output specs to its in_specs.
  """
  single = not isinstance(out_shape, (list, tuple))
  outs = [out_shape] if single else list(out_shape)
  n_args, aliases, body = len(args), {}, kernel
  if cfg.poison:
    args = list(args) + [jnp.full(o.shape, jnp.nan, o.dtype) for o in outs]
    aliases = {n_args + i: i for i in range(len(outs))}
    body = lambda *r: kernel(*(r[:n_args] + r[n_args + len(outs):]))
    if "grid_spec" not in kwargs:
      kwargs["in_specs"] = list(kwargs["in_specs"]) + list(
          kwargs["out_specs"] if not single else [kwargs["out_specs"]])
  return pl.pallas_call(
      body, out_shape=out_shape, input_output_aliases=aliases,
      interpret=cfg.interpret, **kwargs)(*args)


def _full(x):
  """BlockSpec for a table operand: the whole array in every program."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _seq(rows: int | None, dp: int | None):
  """(None, None, rows[, dp]) spec indexed by program (r, b, h)."""
  if dp is None:
    return pl.BlockSpec((None, None, rows), lambda r, b, h: (b, h, r))
  return pl.BlockSpec((None, None, rows, dp), lambda r, b, h: (b, h, r, 0))


def _whole(n: int, dp: int | None):
  if dp is None:
    return pl.BlockSpec((None, None, n), lambda r, b, h: (b, h, 0))
  return pl.BlockSpec((None, None, n, dp), lambda r, b, h: (b, h, 0, 0))


def gpu_forward(q, k, v, cfg: Config):
  b, h, n, dp = q.shape
  table = cfg.table()
  ops = _tables(cfg, cfg.block_q, cfg.block_k, table, True)
  kernel = functools.partial(_gpu_fwd_kernel, cfg=cfg, width=table.width)
  return poisoned_call(
      kernel, cfg, [*ops, q, k, v],
      [jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((b, h, n), jnp.float32)],
      grid=(n // cfg.block_q, b, h),
      in_specs=[_full(x) for x in ops] + [
          _seq(cfg.block_q, dp), _whole(n, dp), _whole(n, dp)],
      out_specs=[_seq(cfg.block_q, dp), _seq(cfg.block_q, None)],
      compiler_params=cfg.params(), name="local_attention_fwd")


def gpu_backward(q, k, v, do, lse, delta, cfg: Config):
  b, h, n, dp = q.shape
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  table_t = cfg.table(bwd=True, transpose=True)
  ops = _tables(cfg, bq, bk, table_t, False)
  dk, dv = poisoned_call(
      functools.partial(_gpu_dkdv_kernel, cfg=cfg, width=table_t.width),
      cfg, [*ops, q, k, v, do, lse, delta],
      [jax.ShapeDtypeStruct(k.shape, k.dtype),
       jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(n // bk, b, h),
      in_specs=[_full(x) for x in ops] + [
          _whole(n, dp), _seq(bk, dp), _seq(bk, dp), _whole(n, dp),
          _whole(n, None), _whole(n, None)],
      out_specs=[_seq(bk, dp), _seq(bk, dp)],
      compiler_params=cfg.params(), name="local_attention_bwd_dkdv")
  table = cfg.table(bwd=True)
  ops = _tables(cfg, bq, bk, table, True)
  dq = poisoned_call(
      functools.partial(_gpu_dq_kernel, cfg=cfg, width=table.width),
      cfg, [*ops, q, k, v, do, lse, delta],
      jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(n // bq, b, h),
      in_specs=[_full(x) for x in ops] + [
          _seq(bq, dp), _whole(n, dp), _whole(n, dp), _seq(bq, dp),
          _seq(bq, None), _seq(bq, None)],
      out_specs=_seq(bq, dp),
      compiler_params=cfg.params(), name="local_attention_bwd_dq")
  return dq, dk, dv
