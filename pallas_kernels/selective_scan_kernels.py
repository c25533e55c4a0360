"""Pallas kernel bodies for the Mamba-1 selective scan (forward, backward).

The pallas_calls (grids, BlockSpecs) that run them, and the XLA recurrences
over time segments between them, are in selective_scan_calls.py.

Layout inside the kernels (built by selective_scan_pallas.py): time-major
rows, channels on the minor (lane) axis, the state as an (N, bd) f32 tile.
  u, delta, z, y, du, ...  (batch, Lp, Dp)      block (T, bd)
  A                        (Np, Dp) f32         block (Np, bd)
  B, C                     (batch, G, Lp, Np)   block (T, Np)
  D, delta_bias            (1, Dp) f32          block (1, bd)
  states                   (batch, nc, Np, Dp)  chunk-boundary states
  per-segment states       (batch, S, Np, Dp)   block (Np, bd)
Time is left-padded with zeros (u = 0 keeps h = 0 there, so padding needs
no mask and contributes nothing to any gradient); channels are padded per
group with zeros for the same reason.

Program structures sharing the per-timestep code (the passes and their
order are described in selective_scan_calls.py):
  "gpu": grid (batch, channel tiles, segments): a program loops sequentially
    over the chunks of its time segment (Triton has no scratch memory and
    no sequential grid axis); the backward's per-chunk recomputed states
    go to an HBM work output. fwd_local_kernel / bwd_local_kernel carry
    only the state (gradient) from zero through a segment, for splits > 1.
  "tpu": grid (batch, channel tiles, chunks) with the chunk axis
    "arbitrary"; the carry and the work buffer live in VMEM scratch.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Static configuration of one kernel instance (hashable)."""
  backend: str  # "gpu" or "tpu": program structure and row access
  interpret: bool
  softplus: bool
  has_z: bool
  block_d: int  # channels per program (power of two)
  chunk: int  # timesteps per chunk (boundary-state spacing)
  num_warps: int = 4
  num_stages: int = 1
  unroll: int = 1  # timesteps per loop iteration (divides chunk)
  poison: bool = False  # tests: outputs start as NaN (aliased inputs)
  splits: int = 1  # GPU: time segments run in parallel (1 on TPU)
  split_chunks: int = 1  # chunks per segment (TPU: all chunks)

  @property
  def seg(self) -> int:
    """Timesteps per segment."""
    return self.split_chunks * self.chunk


class Rows:
  """Per-timestep row access that lowers on both Triton and Mosaic.

  Triton handles 1D vectors and [:, None] natively. Mosaic dislikes 1D
  values and (1, N) -> (N, 1) relayouts, so there a row becomes a column by
  a masked reduction against an identity matrix built from iota (N <= 16,
  so this is cheap next to the (N, bd) state update).
  """

  def __init__(self, cfg: Config, n: int):
    self.gpu = cfg.backend == "gpu"
    if not self.gpu:
      r = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
      c = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
      self.eye = (r == c).astype(F32)

  def row(self, ref, t):
    """(1, bd) f32 row t of a (T, bd) ref."""
    return ref[pl.ds(t, 1), :].astype(F32)

  def col(self, ref, t):
    """Row t of a (T, N) ref as an (N, 1) f32 column."""
    if self.gpu:
      return ref[t, :].astype(F32)[:, None]
    r = ref[pl.ds(t, 1), :].astype(F32)
    return jnp.sum(self.eye * r, axis=1, keepdims=True)

  def put_rowsum(self, ref, t, mat):
    """Writes sum over channels of an (N, bd) tile as row t of (T, N)."""
    if self.gpu:
      ref[t, :] = jnp.sum(mat, axis=1).astype(ref.dtype)
      return
    c = jnp.sum(mat, axis=1, keepdims=True)
    ref[pl.ds(t, 1), :] = jnp.sum(self.eye * c, axis=0,
                                  keepdims=True).astype(ref.dtype)


def _softplus(x):
  # Stable for any x; the derivative (sigmoid) is taken explicitly.
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def step_dt(cfg, rows, refs, t, bias):
  """(dt after bias/softplus, raw dt) rows of timestep t."""
  dt_raw = rows.row(refs["delta"], t) + bias
  return (_softplus(dt_raw) if cfg.softplus else dt_raw), dt_raw


def _step_inputs(cfg, rows, refs, t, bias, need_c=True):
  """Loads timestep t: u, dt (post bias/softplus), raw dt, B and C cols."""
  u = rows.row(refs["u"], t)
  dt, dt_raw = step_dt(cfg, rows, refs, t, bias)
  c = rows.col(refs["C"], t) if need_c else None
  return u, dt, dt_raw, rows.col(refs["B"], t), c


def fwd_chunk(cfg, rows, refs, h, a2, dvec, bias, t0, write_y=True,
              work=None, dtsum=None):
  """Runs cfg.chunk timesteps from h; optionally stores y or pre-states.

  With `dtsum` (a (1, bd) row) also accumulates dt and returns (h, dtsum).
  """

  def load(i):
    t = t0 + i
    x = _step_inputs(cfg, rows, refs, t, bias, need_c=write_y)
    z = rows.row(refs["z"], t) if write_y and cfg.has_z else None
    return x, z

  def compute(i, loaded, carry):
    h, dts = carry
    (u, dt, _, b, c), z = loaded
    h_prev = h
    h = jnp.exp2(dt * a2) * h + b * (dt * u)
    if dts is not None:
      dts = dts + dt
    y = None
    if write_y:
      y = jnp.sum(h * c, axis=0, keepdims=True) + dvec * u
      if z is not None:
        y = y * (z * jax.nn.sigmoid(z))

    def store():
      if work is not None:
        work[i] = h_prev  # state before step i, for the backward
      if y is not None:
        refs["y"][pl.ds(t0 + i, 1), :] = y.astype(refs["y"].dtype)

    return (h, dts), store

  h, dts = unrolled_loop(cfg, load, compute, (h, dtsum))
  return h if dtsum is None else (h, dts)


def unrolled_loop(cfg, load, compute, carry, reverse=False):
  """fori_loop over the chunk, cfg.unroll timesteps per iteration.

  Each iteration issues all its loads first, then runs the dependent
  state updates, then does all its stores: a store between two loads would
  pin their order (the compiler cannot prove that refs do not alias), so
  every timestep would pay a full memory latency on the critical path.
  """
  n = cfg.unroll

  def body(k, carry):
    idx = [k * n + s for s in range(n)]
    if reverse:
      idx = [cfg.chunk - 1 - i for i in idx]
    loaded = [load(i) for i in idx]
    stores = []
    for i, x in zip(idx, loaded):
      carry, store = compute(i, x, carry)
      stores.append(store)
    for store in stores:
      store()
    return carry

  return jax.lax.fori_loop(0, cfg.chunk // n, body, carry)


def _bwd_chunk(cfg, rows, refs, work, carry, a_true, a2, dvec, bias, t0):
  """Reverse time loop over one chunk given its recomputed pre-states."""

  def load(i):
    t = t0 + i
    z = rows.row(refs["z"], t) if cfg.has_z else None
    return (work[i], _step_inputs(cfg, rows, refs, t, bias),
            rows.row(refs["dy"], t), z)

  def compute(i, loaded, carry):
    dh, da, dd, db = carry
    h_prev, (u, dt, dt_raw, b, c), g, z = loaded
    a = jnp.exp2(dt * a2)
    h = a * h_prev + b * (dt * u)
    dz = None
    if z is not None:
      sz = jax.nn.sigmoid(z)
      y = jnp.sum(h * c, axis=0, keepdims=True) + dvec * u
      dz = g * y * sz * (1.0 + z * (1.0 - sz))
      g = g * (z * sz)
    dd = dd + g * u
    dc = h * g
    dh = dh + c * g
    s = jnp.sum(dh * b, axis=0, keepdims=True)
    du = g * dvec + s * dt
    gh = dh * h_prev * a
    ddt = s * u + jnp.sum(gh * a_true, axis=0, keepdims=True)
    da = da + gh * dt
    dbm = dh * (dt * u)
    if cfg.softplus:
      ddt = ddt * jax.nn.sigmoid(dt_raw)
    db = db + ddt

    def store():
      t = t0 + i
      if dz is not None:
        refs["dz"][pl.ds(t, 1), :] = dz.astype(refs["dz"].dtype)
      rows.put_rowsum(refs["dC"], t, dc)
      rows.put_rowsum(refs["dB"], t, dbm)
      refs["du"][pl.ds(t, 1), :] = du.astype(refs["du"].dtype)
      refs["ddelta"][pl.ds(t, 1), :] = ddt.astype(refs["ddelta"].dtype)

    return (dh * a, da, dd, db), store

  return unrolled_loop(cfg, load, compute, carry, reverse=True)


FWD_IN = ("u", "delta", "z", "A", "B", "C", "D", "bias", "init")
FWD_OUT = ("y", "last", "states")
BWD_IN = ("u", "delta", "z", "A", "B", "C", "D", "bias", "states", "dy",
          "dlast", "dend")
BWD_OUT = ("du", "ddelta", "dz", "dA", "dD", "dbias", "dB", "dC")


def present(cfg, names):
  """The names of the refs a kernel instance takes, in order."""
  gone = set()
  if not cfg.has_z:
    gone |= {"z", "dz"}
  if cfg.backend != "gpu" or cfg.splits == 1:
    gone |= {"init", "dend"}
  return [k for k in names if k not in gone]


def bind(cfg, in_names, out_names, refs):
  """Named refs (dict) and the remaining (scratch/work) refs."""
  names = present(cfg, in_names) + present(cfg, out_names)
  return dict(zip(names, refs)), refs[len(names):]


def fwd_kernel(cfg, *refs):
  r, extra = bind(cfg, FWD_IN, FWD_OUT, refs)
  a2 = r["A"][...] * LOG2E  # exp(dt*A) = exp2(dt*A*log2 e)
  dvec, bias = r["D"][...], r["bias"][...]
  rows = Rows(cfg, a2.shape[0])
  if cfg.backend == "gpu":

    def chunk(c, h):
      r["states"][c] = h
      return fwd_chunk(cfg, rows, r, h, a2, dvec, bias, c * cfg.chunk)

    h0 = jnp.zeros(a2.shape, F32)
    if cfg.splits > 1:
      h0 = jnp.where(pl.program_id(2) == 0, h0, r["init"][...])
    h = jax.lax.fori_loop(0, cfg.split_chunks, chunk, h0)
    if cfg.splits == 1:
      r["last"][...] = h
    else:

      @pl.when(pl.program_id(2) == cfg.splits - 1)
      def _():
        r["last"][...] = h

    return
  (h_scr,) = extra
  c = pl.program_id(2)
  nc = cfg.split_chunks

  @pl.when(c == 0)
  def _():
    h_scr[...] = jnp.zeros(a2.shape, F32)

  h = h_scr[...]
  r["states"][...] = h
  h = fwd_chunk(cfg, rows, r, h, a2, dvec, bias, 0)
  h_scr[...] = h

  @pl.when(c == nc - 1)
  def _():
    r["last"][...] = h


def _barrier(cfg):
  """CTA barrier around the HBM work buffer on Triton.

  Triton's layouts need not give the thread that stores a work element the
  load of it, and it inserts no barrier for global memory itself.
  """
  if cfg.backend == "gpu" and not cfg.interpret:
    plgpu.debug_barrier()


def bwd_kernel(cfg, *refs):
  r, extra = bind(cfg, BWD_IN, BWD_OUT, refs)
  a_true = r["A"][...]
  a2 = a_true * LOG2E
  dvec, bias = r["D"][...], r["bias"][...]
  rows = Rows(cfg, a2.shape[0])
  row0 = jnp.zeros(dvec.shape, F32)
  if cfg.backend == "gpu":
    (work,) = extra

    def chunk(k, carry):
      c = cfg.split_chunks - 1 - k
      t0 = c * cfg.chunk
      fwd_chunk(cfg, rows, r, r["states"][c], a2, dvec, bias, t0,
                write_y=False, work=work)
      _barrier(cfg)  # work rows written by one thread, read by another
      carry = _bwd_chunk(cfg, rows, r, work, carry, a_true, a2, dvec, bias,
                         t0)
      _barrier(cfg)  # all reads of work done before the next overwrite
      return carry

    dh0 = r["dlast"][...]
    if cfg.splits > 1:
      dh0 = jnp.where(pl.program_id(2) == cfg.splits - 1, dh0,
                      r["dend"][...])
    init = (dh0, jnp.zeros(a2.shape, F32), row0, row0)
    _, da, dd, db = jax.lax.fori_loop(0, cfg.split_chunks, chunk, init)
    r["dA"][...] = da
    r["dD"][...] = dd
    r["dbias"][...] = db
    return
  dh_scr, work = extra
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    dh_scr[...] = r["dlast"][...]
    r["dA"][...] = jnp.zeros(a2.shape, F32)
    r["dD"][...] = row0
    r["dbias"][...] = row0

  fwd_chunk(cfg, rows, r, r["states"][...], a2, dvec, bias, 0,
            write_y=False, work=work)
  carry = (dh_scr[...], jnp.zeros(a2.shape, F32), row0, row0)
  dh, da, dd, db = _bwd_chunk(cfg, rows, r, work, carry, a_true, a2, dvec,
                              bias, 0)
  dh_scr[...] = dh
  r["dA"][...] += da
  r["dD"][...] += dd
  r["dbias"][...] += db
