"""Mamba-1 selective scan: public entry point, reference and XLA paths.

Semantics follow state-spaces/mamba `selective_scan_ref`, but channels-last:
  dt_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + bias
  h_t  = exp(dt_t A) h_{t-1} + dt_t B_t u_t        (per channel d, state n)
  y_t  = C_t . h_t + D u_t ;  y_t *= silu(z_t) when z is given
Channel d reads group d // (dim // groups) of B and C.

Implementations:
  selective_scan_reference    lax.scan over time in float32 (the oracle)
  selective_scan_associative  lax.associative_scan (XLA; a benchmark
                              baseline, memory O(b L D N))
  impl="pallas"               Pallas kernels (selective_scan_kernels.py):
                              Triton on GPU, Mosaic on TPU, interpret on CPU

On GPU the time axis is also split into segments that run as parallel
programs (a chunk-parallel scan: local passes, a short XLA recurrence over
segments, then the real pass; see selective_scan_kernels.py), so that
batch x channel tiles x segments fills the GPU; `BlockSizes(splits=1)` is
the earlier structure, sequential in time inside each (batch, channel tile)
program, whose time is about length x per-step latency: on an H100 it beat
the associative scan at batch 8 (fwd 2-3x, fwd+bwd 3-4x) but not at batch 2
(bench/scan.py, docs/benchmarks.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _backend
from pallas_kernels import selective_scan_pallas as sp
from pallas_kernels.selective_scan_pallas import BlockSizes

__all__ = ["BlockSizes", "selective_scan", "selective_scan_associative",
           "selective_scan_reference"]

F32 = jnp.float32


def _check_float(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")


def _validate(u, delta, A, B, C, D, z, delta_bias):
  """Raises ValueError naming the first argument whose shape is wrong."""
  if u.ndim != 3:
    raise ValueError(f"u must be (batch, length, dim), got shape {u.shape}")
  b, length, dim = u.shape
  if A.ndim != 2 or A.shape[0] != dim:
    raise ValueError(f"A must be (dim, state) = ({dim}, state), got shape "
                     f"{A.shape}")
  state = A.shape[1]
  if state == 0:
    raise ValueError("A must have a state size > 0, got shape "
                     f"{A.shape}")
  if B.ndim != 4 or B.shape[:2] != (b, length) or B.shape[3] != state:
    raise ValueError(f"B must be (batch, length, groups, state) = ({b}, "
                     f"{length}, groups, {state}), got shape {B.shape}")
  groups = B.shape[2]
  if groups == 0 or dim % groups:
    raise ValueError(f"dim ({dim}) must be divisible by groups ({groups}) "
                     f"of B, shape {B.shape}")
  expect = {"delta": (delta, (b, length, dim)),
            "C": (C, (b, length, groups, state)),
            "D": (D, (dim,)), "z": (z, (b, length, dim)),
            "delta_bias": (delta_bias, (dim,))}
  for name, (x, shape) in expect.items():
    if x is not None and tuple(x.shape) != shape:
      raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
  for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C),
                  ("D", D), ("z", z), ("delta_bias", delta_bias)):
    if x is not None:
      _check_float(name, x)


def _dt(delta, delta_bias, delta_softplus):
  dt = delta.astype(F32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(F32)
  return jax.nn.softplus(dt) if delta_softplus else dt


def _finish(y, u, D, z):
  """Adds the D skip and the silu(z) gate; casts to u.dtype."""
  if D is not None:
    y = y + u.astype(F32) * D.astype(F32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(F32))
  return y.astype(u.dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None,
                             delta_bias=None, delta_softplus=False,
                             return_last_state=False):
  """Pure-jnp selective scan: lax.scan over time, float32 math.

  Args and returns as `selective_scan`.
  """
  _validate(u, delta, A, B, C, D, z, delta_bias)
  b, _, dim = u.shape
  groups, state = B.shape[2:]
  rep = dim // groups
  dt = _dt(delta, delta_bias, delta_softplus)
  a = A.astype(F32)

  def step(h, xs):
    u_t, dt_t, b_t, c_t = xs  # (b, D), (b, D), (b, G, N), (b, G, N)
    b_t = jnp.repeat(b_t.astype(F32), rep, axis=1)
    c_t = jnp.repeat(c_t.astype(F32), rep, axis=1)
    h = (jnp.exp(dt_t[..., None] * a) * h
         + (dt_t * u_t)[..., None] * b_t)
    return h, jnp.sum(h * c_t, axis=-1)

  xs = tuple(jnp.swapaxes(x, 0, 1)
             for x in (u.astype(F32), dt, B, C))
  h0 = jnp.zeros((b, dim, state), F32)
  last, y = jax.lax.scan(step, h0, xs)
  y = _finish(jnp.swapaxes(y, 0, 1), u, D, z)
  return (y, last) if return_last_state else y


def selective_scan_associative(u, delta, A, B, C, D=None, z=None,
                               delta_bias=None, delta_softplus=False,
                               return_last_state=False):
  """Selective scan as an XLA `lax.associative_scan` over time.

  Materialises (batch, length, dim, state) f32 tensors: fast-ish on
  accelerators, memory-hungry. Args and returns as `selective_scan`.
  """
  _validate(u, delta, A, B, C, D, z, delta_bias)
  b, length, dim = u.shape
  groups, state = B.shape[2:]
  rep = dim // groups
  dt = _dt(delta, delta_bias, delta_softplus)
  da = jnp.exp(dt[..., None] * A.astype(F32))  # (b, L, D, N)
  bx = jnp.repeat(B.astype(F32), rep, axis=2)
  dbu = (dt * u.astype(F32))[..., None] * bx

  def combine(x, y):
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2

  _, h = jax.lax.associative_scan(combine, (da, dbu), axis=1)
  c = jnp.repeat(C.astype(F32), rep, axis=2)
  y = _finish(jnp.sum(h * c, axis=-1), u, D, z)
  del length
  return (y, h[:, -1]) if return_last_state else y


def _pallas(backend, interpret, softplus, block_sizes, u, delta, A, B, C, D,
            bias, z=None):
  cfg = sp.make_config(backend, interpret, softplus, z is not None,
                       u.shape[0], u.shape[1], u.shape[2], B.shape[2],
                       block_sizes)
  return sp.scan(cfg, u, delta, A, B, C, D, z, bias)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False,
                   impl="auto", block_sizes: BlockSizes | None = None):
  """Mamba-1 selective scan, differentiable in every array argument.

  Args:
    u: (batch, length, dim) input.
    delta: (batch, length, dim) time steps (before bias/softplus).
    A: (dim, state) state matrix (diagonal per channel; usually negative).
    B: (batch, length, groups, state) input projection; dim % groups == 0.
    C: (batch, length, groups, state) output projection.
    D: optional (dim,) skip weight.
    z: optional (batch, length, dim) gate; y *= silu(z).
    delta_bias: optional (dim,) added to delta.
    delta_softplus: apply softplus to delta + delta_bias.
    return_last_state: also return the final state.
    impl: "auto" (Pallas on GPU/TPU, reference elsewhere), "pallas" (on CPU:
      interpret mode) or "reference".
    block_sizes: optional kernel tuning (GPU block_d/chunk/warps/splits).

  Returns:
    y (batch, length, dim) in u.dtype, and with return_last_state the last
    state (batch, dim, state) float32.
  """
  _backend.check_impl(impl)
  _validate(u, delta, A, B, C, D, z, delta_bias)
  ref = functools.partial(selective_scan_reference,
                          delta_softplus=delta_softplus,
                          return_last_state=True)
  dim = u.shape[2]
  # Absent D / delta_bias are zeros for the kernels (their grads unused).
  d_arr = jnp.zeros((dim,), F32) if D is None else D
  b_arr = jnp.zeros((dim,), F32) if delta_bias is None else delta_bias

  def reference(u, delta, A, B, C, D_, bias_, *zs):
    return ref(u, delta, A, B, C, D=None if D is None else D_,
               z=zs[0] if zs else None,
               delta_bias=None if delta_bias is None else bias_)

  def kernel(backend, interpret):
    return functools.partial(_pallas, backend, interpret, delta_softplus,
                             block_sizes)

  run = _backend.select(
      impl, reference=reference, gpu=kernel("gpu", False),
      tpu=kernel("tpu", False), interpret=kernel("gpu", True))
  args = (u, delta, A, B, C, d_arr, b_arr) + (() if z is None else (z,))
  y, last = run(*args)
  return (y, last) if return_last_state else y
