"""Pure-jnp reference for linear attention (the oracle and the CPU path)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import linear_attention_tiles as tiles

_HI = lax.Precision.HIGHEST
# Chunk of the causal reference: the quadratic masked form inside a chunk and
# a running state across chunks keeps memory O(N * chunk) at any length.
REF_CHUNK = 128


def linear_attention_reference(q, k, v, *, feature_map="elu", causal=False,
                               eps=1e-6):
  """Linear attention in float32 with plain jnp; see `linear_attention`.

  Args:
    q: (B, N, heads, d) queries.
    k: (B, N, heads, d) keys.
    v: (B, N, heads, dv) values.
    feature_map: "elu" (elu(x) + 1) or "relu".
    causal: sum over j <= i only.
    eps: added to the denominator.

  Returns:
    (B, N, heads, dv) in q's dtype.
  """
  qf = tiles.phi(q, feature_map)
  kf = tiles.phi(k, feature_map)
  vf = v.astype(jnp.float32)
  if causal:
    out = _causal_chunked(qf, kf, vf, eps)
  else:
    s = jnp.einsum("bnhd,bnhe->bhde", kf, vf, precision=_HI)
    z = jnp.sum(kf, axis=1)  # (B, H, d)
    num = jnp.einsum("bnhd,bhde->bnhe", qf, s, precision=_HI)
    den = jnp.einsum("bnhd,bhd->bnh", qf, z, precision=_HI) + eps
    out = num / _nonzero(den)[..., None]
  return out.astype(q.dtype)


def _nonzero(den):
  # As in the kernels: den == 0 implies num == 0 (phi >= 0); 0 / 0 := 0.
  return jnp.where(den == 0, 1.0, den)


def _causal_chunked(qf, kf, vf, eps):
  b, n, h, d = qf.shape
  dv = vf.shape[-1]
  c = min(REF_CHUNK, n)
  nc = -(-n // c)
  pad = nc * c - n
  # Zero-padded keys contribute nothing; padded query rows are dropped.
  padf = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
  # (nc, B, H, c, d): chunks on the scan axis.
  chunk = lambda x: padf(x).reshape(b, nc, c, h, -1).transpose(1, 0, 3, 2, 4)
  mask = jnp.tril(jnp.ones((c, c), bool))

  def step(carry, xs):
    s, z = carry
    qc, kc, vc = xs
    a = jnp.einsum("bhid,bhjd->bhij", qc, kc, precision=_HI)
    a = jnp.where(mask, a, 0.0)
    num = (jnp.einsum("bhij,bhje->bhie", a, vc, precision=_HI)
           + jnp.einsum("bhid,bhde->bhie", qc, s, precision=_HI))
    den = (a.sum(-1) + jnp.einsum("bhid,bhd->bhi", qc, z, precision=_HI)
           + eps)
    s = s + jnp.einsum("bhjd,bhje->bhde", kc, vc, precision=_HI)
    z = z + kc.sum(2)
    return (s, z), num / _nonzero(den)[..., None]

  init = (jnp.zeros((b, h, d, dv), jnp.float32),
          jnp.zeros((b, h, d), jnp.float32))
  _, out = lax.scan(step, init, (chunk(qf), chunk(kf), chunk(vf)))
  out = out.transpose(1, 0, 3, 2, 4).reshape(b, nc * c, h, dv)
  return out[:, :n]


def check_inputs(q, k, v, feature_map, causal, eps):
  """Raises ValueError naming the bad argument and what was expected."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"{name} must have rank 4 (B, N, heads, head_dim), got shape "
          f"{getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
  if k.shape != q.shape:
    raise ValueError(f"k.shape must equal q.shape {q.shape}, got {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(
        f"v.shape[:3] must equal q.shape[:3] {q.shape[:3]}, got {v.shape}")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
        f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if feature_map not in ("elu", "relu"):
    raise ValueError(
        f"feature_map must be 'elu' or 'relu', got {feature_map!r}")
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a Python bool, got {causal!r}")
  if isinstance(eps, jax.Array) or not isinstance(eps, (int, float)):
    raise ValueError(f"eps must be a Python float >= 0, got {eps!r}")
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  if 0 in q.shape or v.shape[-1] == 0:
    raise ValueError(f"q, k, v must be non-empty, got {q.shape}, {v.shape}")
