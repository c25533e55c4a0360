"""Linear attention (Katharopoulos et al. 2020; SANA / LinFusion in DiTs).

out_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps),
with sums over j <= i when causal, phi = elu(x) + 1 or relu.

Non-causal (the DiT case) is two passes: reduce S = phi(K)^T [V | 1] per
(batch, head), then a fully parallel output pass with phi, normalisation and
the cast fused; the backward is closed-form (linear_attention_tiles.py).
Causal is chunked with a carried f32 state. Kernels: Triton on GPU
(linear_attention_gpu*.py, native layout), Mosaic on TPU
(linear_attention_tpu.py). Design notes: notes/kernels.md §7.3.
"""
from __future__ import annotations

import dataclasses
import functools

import jax

from pallas_kernels import _backend
from pallas_kernels import linear_attention_gpu as lgpu
from pallas_kernels import linear_attention_gpu_causal as lgpu_causal
from pallas_kernels import linear_attention_tpu as ltpu
from pallas_kernels.linear_attention_ref import check_inputs
from pallas_kernels.linear_attention_ref import linear_attention_reference

__all__ = ["linear_attention", "linear_attention_reference", "BlockSizes"]

BlockSizes = lgpu.BlockSizes


@dataclasses.dataclass(frozen=True)
class _Static:
  feature_map: str
  causal: bool
  eps: float
  # "gpu" (Triton), "tpu" (Mosaic), "interpret" (the Triton kernels in
  # interpret mode: impl="pallas" on CPU) or "tpu_interpret" (tests).
  backend: str
  block_sizes: lgpu.BlockSizes


def _forward(cfg: _Static, q, k, v):
  """Returns (out, residuals)."""
  kw = dict(fm=cfg.feature_map, eps=cfg.eps)
  if cfg.backend.startswith("tpu"):
    return ltpu.forward(q, k, v, causal=cfg.causal,
                        interpret=cfg.backend == "tpu_interpret", **kw)
  kw.update(bs=cfg.block_sizes, interpret=cfg.backend == "interpret")
  if cfg.causal:
    out, den = lgpu_causal.causal_forward(q, k, v, **kw)
    return out, (q, k, v, out, den)
  out, (s, z) = lgpu.nc_forward(q, k, v, **kw)
  return out, (q, k, v, s, z)


def _backward(cfg: _Static, res, g):
  fm = cfg.feature_map
  if cfg.backend.startswith("tpu"):
    return ltpu.backward(res, g, causal=cfg.causal, fm=fm, eps=cfg.eps,
                         interpret=cfg.backend == "tpu_interpret")
  kw = dict(fm=fm, bs=cfg.block_sizes, interpret=cfg.backend == "interpret")
  if cfg.causal:
    return lgpu_causal.causal_backward(*res, g, **kw)
  return lgpu.nc_backward(*res, g, eps=cfg.eps, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(cfg: _Static, q, k, v):
  return _forward(cfg, q, k, v)[0]


_kernel.defvjp(_forward, _backward)


def _check_block_sizes(bs):
  if not isinstance(bs, lgpu.BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes, got {bs!r}")
  for name in ("block_n", "chunk"):
    x = getattr(bs, name)
    # Triton values need power-of-two sizes; its MMAs want >= 16 per side.
    if x < 16 or x & (x - 1):
      raise ValueError(
          f"block_sizes.{name} must be a power of two >= 16, got {x}")
  for name in ("target_programs", "min_split_rows", "tiles_per_program"):
    if getattr(bs, name) < 1:
      raise ValueError(f"block_sizes.{name} must be >= 1")


def linear_attention(q, k, v, *, feature_map="elu", causal=False, eps=1e-6,
                     impl="auto", block_sizes=None):
  """Linear attention over (B, N, heads, head_dim) inputs.

  Args:
    q: (B, N, heads, d) queries, a float dtype.
    k: (B, N, heads, d) keys, q's dtype.
    v: (B, N, heads, dv) values, q's dtype (dv may differ from d).
    feature_map: "elu" (elu(x) + 1) or "relu".
    causal: if True, position i attends to j <= i only.
    eps: >= 0, added to the denominator. A row whose denominator is exactly
      0 (possible with relu, or eps = 0) has a zero numerator too and
      outputs 0.
    impl: "auto" (Pallas on GPU/TPU, reference elsewhere), "pallas" (the
      kernel; interpret mode on CPU) or "reference" (pure jnp).
    block_sizes: optional `BlockSizes` for the GPU kernels.

  Returns:
    (B, N, heads, dv) in q's dtype; accumulation is float32.

  Raises:
    ValueError: on bad shapes, dtypes, feature_map, eps or impl.
  """
  _backend.check_impl(impl)
  check_inputs(q, k, v, feature_map, causal, eps)
  eps = float(eps)
  ref = functools.partial(linear_attention_reference, feature_map=feature_map,
                          causal=causal, eps=eps)
  bs = block_sizes or lgpu.BlockSizes.get_default()
  _check_block_sizes(bs)
  make = lambda backend: functools.partial(
      _kernel, _Static(feature_map, causal, eps, backend, bs))
  fn = _backend.select(impl, reference=ref, gpu=make("gpu"), tpu=make("tpu"),
                       interpret=make("interpret"))
  return fn(q, k, v)
