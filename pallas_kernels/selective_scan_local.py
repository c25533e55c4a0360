"""Local passes of the chunk-parallel GPU selective scan (splits > 1).

Each runs one time segment with the state (forward) or the state gradient
(backward) starting from zero, so that a short XLA recurrence over segments
(selective_scan_calls.py) can give every segment its true initial state or
end gradient. They share the per-timestep code and the layout of
selective_scan_kernels.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import selective_scan_kernels as k


def _bwd_local_chunk(cfg, rows, refs, carry, a2, bias, t0):
  """Reverse loop over one chunk carrying only the state gradient (and the
  sum of dt): dh <- (dh + C_t g_t) * exp(dt_t A)."""

  def load(i):
    t = t0 + i
    z = rows.row(refs["z"], t) if cfg.has_z else None
    return (k.step_dt(cfg, rows, refs, t, bias)[0], rows.col(refs["C"], t),
            rows.row(refs["dy"], t), z)

  def compute(i, loaded, carry):
    del i
    dh, dts = carry
    dt, c, g, z = loaded
    if z is not None:
      g = g * (z * jax.nn.sigmoid(z))
    return ((dh + c * g) * jnp.exp2(dt * a2), dts + dt), lambda: None

  return k.unrolled_loop(cfg, load, compute, carry, reverse=True)


FWD_LOCAL_IN = ("u", "delta", "A", "B", "bias")
FWD_LOCAL_OUT = ("hloc", "dtsum")
BWD_LOCAL_IN = ("delta", "z", "A", "C", "bias", "dy", "dlast")
BWD_LOCAL_OUT = ("dhloc", "dtsum")


def fwd_local_kernel(cfg, *refs):
  """Phase 1 (GPU, splits > 1): one segment from a zero state."""
  r, _ = k.bind(cfg, FWD_LOCAL_IN, FWD_LOCAL_OUT, refs)
  a2 = r["A"][...] * k.LOG2E
  bias = r["bias"][...]
  rows = k.Rows(cfg, a2.shape[0])

  def chunk(c, carry):
    h, dts = carry
    return k.fwd_chunk(cfg, rows, r, h, a2, None, bias, c * cfg.chunk,
                       write_y=False, dtsum=dts)

  init = (jnp.zeros(a2.shape, k.F32), jnp.zeros(bias.shape, k.F32))
  h, dts = jax.lax.fori_loop(0, cfg.split_chunks, chunk, init)
  r["hloc"][...] = h
  r["dtsum"][...] = dts


def bwd_local_kernel(cfg, *refs):
  """Backward phase 1 (GPU, splits > 1): one segment in reverse from a zero
  state gradient (the last segment: from the last-state cotangent); writes
  the gradient at its start and its sum of dt."""
  r, _ = k.bind(cfg, BWD_LOCAL_IN, BWD_LOCAL_OUT, refs)
  a2 = r["A"][...] * k.LOG2E
  bias = r["bias"][...]
  rows = k.Rows(cfg, a2.shape[0])

  def chunk(i, carry):
    t0 = (cfg.split_chunks - 1 - i) * cfg.chunk
    return _bwd_local_chunk(cfg, rows, r, carry, a2, bias, t0)

  last = pl.program_id(2) == cfg.splits - 2  # grid skips segment 0
  dh0 = jnp.where(last, r["dlast"][...], jnp.zeros(a2.shape, k.F32))
  init = (dh0, jnp.zeros(bias.shape, k.F32))
  dh, dts = jax.lax.fori_loop(0, cfg.split_chunks, chunk, init)
  r["dhloc"][...] = dh
  r["dtsum"][...] = dts
