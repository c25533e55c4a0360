"""Mosaic (TPU) kernels for local attention.

Same math as the Triton kernels (local_attention_kernels.py), organised the
TPU way: the visited key (or query) blocks form the last, sequential grid
axis; the block tables are scalar-prefetched into SMEM and drive the K/V
index maps, as in splash attention, so unused table slots (which repeat the
last entry) cost no copy; accumulators live in VMEM scratch. Blocks are 128
tokens so that logits and statistics are lane-dense.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.local_attention_geometry import MASK_VALUE, window_mask
from pallas_kernels.local_attention_kernels import (LOG2E, Config, _bases,
                                                    _dkdv_step, _dq_step,
                                                    _fwd_finish, _fwd_step,
                                                    _tables, poisoned_call)

_SUBLANES = 8
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _branches(j, cnt_ref, row, step):
  """Calls step(masked) for masked, then unmasked, slots of table `row`."""
  n_masked, n_total = cnt_ref[2 * row], cnt_ref[2 * row + 1]
  pl.when(j < n_masked)(lambda: step(True))
  pl.when((j >= n_masked) & (j < n_total))(lambda: step(False))


def _fwd_kernel(idx_ref, cnt_ref, qb_ref, kb_ref, q_ref, k_ref, v_ref, o_ref,
                lse_ref, m_scr, l_scr, acc_scr, *, cfg: Config, width: int):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(masked):
    kb = idx_ref[i * width + j]
    mask = window_mask(cfg.geo, _bases(cfg, qb_ref, i),
                       _bases(cfg, kb_ref, kb), cfg.block_q,
                       cfg.block_k) if masked else None
    m, l, acc = _fwd_step(q_ref[...], k_ref[...], v_ref[...],
                          (m_scr[...], l_scr[...], acc_scr[...]), mask,
                          cfg.scale * LOG2E)
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

  _branches(j, cnt_ref, i, step)

  @pl.when(j == width - 1)
  def _():
    o, lse = _fwd_finish(m_scr[...], l_scr[...], acc_scr[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dkdv_kernel(idx_ref, cnt_ref, kb_ref, qb_ref, q_ref, k_ref, v_ref,
                 do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr,
                 *, cfg: Config, width: int):
  j, t = pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(masked):
    qi = idx_ref[j * width + t]
    mask = window_mask(cfg.geo, _bases(cfg, qb_ref, qi),
                       _bases(cfg, kb_ref, j), cfg.block_q_bwd,
                       cfg.block_k_bwd, keys_on_rows=True) if masked else None
    dk, dv = _dkdv_step(k_ref[...], v_ref[...], q_ref[...], do_ref[...],
                        lse_ref[:1, :], delta_ref[:1, :],
                        (dk_scr[...], dv_scr[...]), mask, cfg.scale * LOG2E)
    dk_scr[...], dv_scr[...] = dk, dv

  _branches(t, cnt_ref, j, step)

  @pl.when(t == width - 1)
  def _():
    dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(idx_ref, cnt_ref, qb_ref, kb_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dq_scr, *, cfg: Config,
               width: int):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def step(masked):
    kb = idx_ref[i * width + j]
    mask = window_mask(cfg.geo, _bases(cfg, qb_ref, i),
                       _bases(cfg, kb_ref, kb), cfg.block_q_bwd,
                       cfg.block_k_bwd) if masked else None
    dq_scr[...] = _dq_step(q_ref[...], do_ref[...], k_ref[...], v_ref[...],
                           lse_ref[...], delta_ref[...], dq_scr[...], mask,
                           cfg.scale * LOG2E)

  _branches(j, cnt_ref, i, step)

  @pl.when(j == width - 1)
  def _():
    dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _own(rows, cols):
  """Block (b, h, r) of a (B, H, n, cols) array, r the grid's 3rd axis."""
  return pl.BlockSpec((None, None, rows, cols),
                      lambda b, h, r, s, *_: (b, h, r, 0))


def _visited(rows, cols, width):
  """Block of the table entry (r, s): the visited block of this step."""
  return pl.BlockSpec(
      (None, None, rows, cols),
      lambda b, h, r, s, idx, *_: (b, h, idx[r * width + s], 0))


def _call(kernel, cfg, table, ops, grid, in_specs, out_specs, out_shape,
          scratch, name, *args):
  if cfg.poison:  # the NaN-filled aliased outputs are extra inputs
    outs = out_specs if isinstance(out_specs, list) else [out_specs]
    in_specs = list(in_specs) + outs
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(ops), grid=grid, in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch)
  return poisoned_call(
      functools.partial(kernel, cfg=cfg, width=table.width), cfg,
      [*ops, *args], out_shape, grid_spec=spec,
      compiler_params=cfg.params(*_SEMANTICS), name=name)


def tpu_forward(q, k, v, cfg: Config):
  """Returns o (B, H, Np, Dp) and base-2 logsumexp (B, H, Np) float32."""
  b, h, n, dp = q.shape
  bq, bk = cfg.block_q, cfg.block_k
  table = cfg.table()
  ops = _tables(cfg, bq, bk, table, True)
  o, lse = _call(
      _fwd_kernel, cfg, table, ops, (b, h, n // bq, table.width),
      [_own(bq, dp), _visited(bk, dp, table.width),
       _visited(bk, dp, table.width)],
      [_own(bq, dp), _own(bq, 1)],
      [jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((b, h, n, 1), jnp.float32)],
      [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
       pltpu.VMEM((bq, dp), jnp.float32)],
      "local_attention_fwd", q, k, v)
  return o, lse[..., 0]


def tpu_backward(q, k, v, do, lse, delta, cfg: Config):
  b, h, n, dp = q.shape
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  # dK/dV works on transposed logits and wants lse/delta as rows (sublane
  # broadcast, as splash does); dQ wants them as columns.
  rows = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, h, _SUBLANES, n))
  table_t = cfg.table(bwd=True, transpose=True)
  ops = _tables(cfg, bq, bk, table_t, False)
  w = table_t.width
  row_spec = pl.BlockSpec(
      (None, None, _SUBLANES, bq),
      lambda b_, h_, r, s, idx, *_: (b_, h_, 0, idx[r * w + s]))
  dk, dv = _call(
      _dkdv_kernel, cfg, table_t, ops, (b, h, n // bk, w),
      [_visited(bq, dp, w), _own(bk, dp), _own(bk, dp), _visited(bq, dp, w),
       row_spec, row_spec],
      [_own(bk, dp), _own(bk, dp)],
      [jax.ShapeDtypeStruct(k.shape, k.dtype),
       jax.ShapeDtypeStruct(v.shape, v.dtype)],
      [pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)],
      "local_attention_bwd_dkdv", q, k, v, do, rows(lse), rows(delta))
  table = cfg.table(bwd=True)
  ops = _tables(cfg, bq, bk, table, True)
  w = table.width
  dq = _call(
      _dq_kernel, cfg, table, ops, (b, h, n // bq, w),
      [_own(bq, dp), _visited(bk, dp, w), _visited(bk, dp, w), _own(bq, dp),
       _own(bq, 1), _own(bq, 1)],
      _own(bq, dp), jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((bq, dp), jnp.float32)],
      "local_attention_bwd_dq", q, k, v, do, lse[..., None],
      delta[..., None])
  return dq, dk, dv
