"""Per-tile math shared by the Triton and Mosaic linear-attention kernels.

Everything here works on values (not refs) so the GPU kernels (which loop over
tiles inside one program) and the TPU kernels (which get one tile per grid
step) run exactly the same arithmetic. Vectors are kept 2D ((1, d) rows and
(t, 1) columns) because Mosaic wants 2D values; Triton accepts both.

Notation: qf = phi(q), kf = phi(k); S = sum_j kf_j^T v_j (d, dv) and
z = sum_j kf_j (1, d). For row i: num_i = qf_i S, den_i = qf_i . z + eps,
o_i = num_i / den_i. With g = dO: dnum_i = g_i / den_i and
dden_i = -(g_i . o_i) / den_i.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def phi(x: jax.Array, feature_map: str) -> jax.Array:
  """Feature map in float32: elu(x) + 1 or relu(x)."""
  x = x.astype(F32)
  if feature_map == "elu":
    # elu(x) + 1 == x + 1 for x > 0 and exp(x) otherwise; the min() keeps the
    # untaken exp branch finite.
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))
  return jnp.maximum(x, 0.0)


def dphi(x: jax.Array, feature_map: str) -> jax.Array:
  """Derivative of `phi` in float32."""
  x = x.astype(F32)
  if feature_map == "elu":
    return jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0)))
  return jnp.where(x > 0, 1.0, 0.0)


def mm(a, b, *, ta=False, tb=False, dtype=None):
  """2D matmul with f32 accumulation; ta/tb transpose a/b first.

  `dtype` is the operand dtype: 16-bit inputs run the MMA in that dtype (as
  fla does), f32 inputs stay f32.
  """
  if dtype is not None:
    a, b = a.astype(dtype), b.astype(dtype)
  dims = (((0,) if ta else (1,)), ((1,) if tb else (0,)))
  return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=F32)


def valid_mask(shape, row0, n_rows, n_cols):
  """True where row0 + row < n_rows and col < n_cols (padding is False)."""
  rows = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, shape, 1)
  return (rows < n_rows) & (cols < n_cols)


def features(x, valid, feature_map):
  """phi(x) with padded rows/columns forced to 0 (phi(0) = 1 for elu)."""
  return jnp.where(valid, phi(x, feature_map), 0.0)


def tril(t):
  r = lax.broadcasted_iota(jnp.int32, (t, t), 0)
  c = lax.broadcasted_iota(jnp.int32, (t, t), 1)
  return r >= c


def _row_dot(a, b):
  return jnp.sum(a * b, axis=1, keepdims=True)


def _nonzero(den):
  # den == 0 only when every phi(q_i) . phi(k_j) is 0 (phi >= 0), so num is
  # 0 too: define 0 / 0 = 0. This covers padded rows and eps = 0.
  return jnp.where(den == 0, 1.0, den)


# Non-causal ------------------------------------------------------------------


def reduce_tile(kf, v, cd):
  """Contribution of one key tile to (S, z)."""
  return mm(kf, v, ta=True, dtype=cd), jnp.sum(kf, axis=0, keepdims=True)


def out_tile(qf, s, z, eps, cd):
  """Output rows of one query tile and their denominators (t, 1)."""
  den = _nonzero(_row_dot(qf, z) + eps)
  return mm(qf, s, dtype=cd) / den, den


def dnum_dden(g, o, den):
  g = g.astype(F32)
  return g / den, -_row_dot(g, o.astype(F32)) / den


def bwd_q_tile(q, qf, g, s, z, eps, feature_map, cd):
  """dq of one query tile plus its contribution to (dS, dz)."""
  o, den = out_tile(qf, s, z, eps, cd)
  dnum, dden = dnum_dden(g, o, den)
  dqf = mm(dnum, s, tb=True, dtype=cd) + dden * z
  ds = mm(qf, dnum, ta=True, dtype=cd)
  dz = jnp.sum(qf * dden, axis=0, keepdims=True)
  return dqf * dphi(q, feature_map), ds, dz


def bwd_kv_tile(k, kf, v, ds, dz, feature_map, cd):
  """dk and dv of one key tile given the full (dS, dz)."""
  dkf = mm(v, ds, tb=True, dtype=cd) + dz
  return dkf * dphi(k, feature_map), mm(kf, ds, dtype=cd)


# Causal (chunked) ------------------------------------------------------------


def causal_fwd_chunk(qf, kf, v, s, z, eps, cd):
  """One chunk: outputs, denominators and the state after the chunk.

  s, z hold the sums over all earlier chunks; the chunk itself is handled as
  masked quadratic attention.
  """
  t = qf.shape[0]
  a = jnp.where(tril(t), mm(qf, kf, tb=True, dtype=cd), 0.0)
  num = mm(a, v, dtype=cd) + mm(qf, s, dtype=cd)
  den = _nonzero(jnp.sum(a, axis=1, keepdims=True) + _row_dot(qf, z) + eps)
  s = s + mm(kf, v, ta=True, dtype=cd)
  z = z + jnp.sum(kf, axis=0, keepdims=True)
  return num / den, den, s, z


def _dm(dnum, dden, v, cd):
  """Masked (t, t) matrix dL/dA[i, j] = dnum_i . v_j + dden_i, j <= i."""
  t = dnum.shape[0]
  return jnp.where(tril(t), mm(dnum, v, tb=True, dtype=cd) + dden, 0.0)


def causal_dq_chunk(q, qf, kf, v, g, o, den, s, z, feature_map, cd):
  """dq of one chunk (forward sweep); returns dq and the updated state."""
  dnum, dden = dnum_dden(g, o, den)
  dm = _dm(dnum, dden, v, cd)
  dqf = mm(dm, kf, dtype=cd) + mm(dnum, s, tb=True, dtype=cd) + dden * z
  s = s + mm(kf, v, ta=True, dtype=cd)
  z = z + jnp.sum(kf, axis=0, keepdims=True)
  return dqf * dphi(q, feature_map), s, z


def causal_dkv_chunk(k, kf, qf, v, g, o, den, ds, dz, feature_map, cd):
  """dk, dv of one chunk (reverse sweep) given (dS, dz) of later chunks."""
  t = qf.shape[0]
  dnum, dden = dnum_dden(g, o, den)
  p = jnp.where(tril(t), mm(qf, kf, tb=True, dtype=cd), 0.0)
  dm = _dm(dnum, dden, v, cd)
  dv = mm(p, dnum, ta=True, dtype=cd) + mm(kf, ds, dtype=cd)
  dkf = mm(dm, qf, ta=True, dtype=cd) + mm(v, ds, tb=True, dtype=cd) + dz
  ds = ds + mm(qf, dnum, ta=True, dtype=cd)
  dz = dz + jnp.sum(qf * dden, axis=0, keepdims=True)
  return dkf * dphi(k, feature_map), dv, ds, dz
