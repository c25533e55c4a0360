"""Full (dense) attention: cuDNN flash attention on GPU, splash on TPU.

Not a kernel of our own (shared/DESIGN.md): on CUDA this asks
`jax.nn.dot_product_attention` for cuDNN's fused flash attention, on TPU it
runs jax's Pallas splash attention with a full mask, and elsewhere XLA's
attention. jax's default ("xla") implementation materialises the
(heads, N, M) score matrix on both accelerators: a gigabyte per sample of
DiT-XL at 4096 tokens.

What each path needs, else it falls back to XLA at lowering time:
  cuDNN   16-bit inputs, head_dim a multiple of 8 and <= 128, and a cuDNN
          the lowering can query (so exporting for CUDA from a CPU host
          lowers the XLA path);
  splash  query and key lengths multiples of 128 (its blocks are 128-lane
          dense); any head_dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _backend

LANES = 128


def check_inputs(q, k, v) -> None:
  """Raises ValueError naming the bad argument and what was expected."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must have rank 4 (B, N, heads, head_dim), got "
                       f"shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f"k must have shape ({b}, M, {h}, {d}), got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must have shape {k.shape[:3]} + (head_dim_v,), got "
                     f"{v.shape}")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}")


def _xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v)


def _cudnn(q, k, v):
  head_dim = q.shape[-1]
  if (q.dtype not in (jnp.bfloat16, jnp.float16) or head_dim % 8
      or head_dim > 128):
    return _xla(q, k, v)
  try:  # traced at lowering: cuDNN's version and limits are checked here
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  except (RuntimeError, ValueError, NotImplementedError):
    return _xla(q, k, v)


def _block(n: int) -> int:
  """The largest of 512, 256, 128 dividing n (splash block size)."""
  return next(b for b in (512, 256, LANES) if n % b == 0)


def _splash(q, k, v, *, interpret=False):
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as sk, splash_attention_mask as sm)
  _, n, heads, head_dim = q.shape
  m = k.shape[1]
  if n % LANES or m % LANES:
    return _xla(q, k, v)
  bq, bk = _block(n), _block(m)
  sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                        block_q_dkv=bq, block_kv_dkv=bk,
                        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = sm.MultiHeadMask([sm.FullMask((n, m))] * heads)
  kernel = sk.make_splash_mha(mask=mask, block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, interpret=interpret)
  # Splash takes (heads, N, head_dim) per example and leaves scaling to us.
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  scale = jnp.asarray(head_dim ** -0.5, q.dtype)
  out = jax.vmap(kernel)(heads_first(q) * scale, heads_first(k),
                         heads_first(v))
  return heads_first(out).astype(q.dtype)


def dot_product_attention(q, k, v, *, impl="auto"):
  """softmax(q k^T / sqrt(head_dim)) v over (B, N, heads, head_dim) inputs.

  Args:
    q: (B, N, heads, head_dim) queries.
    k: (B, M, heads, head_dim) keys (M may differ from N), q's dtype.
    v: (B, M, heads, head_dim_v) values, q's dtype.
    impl: "auto" (cuDNN on GPU, splash on TPU, XLA elsewhere), "pallas"
      (splash; in interpret mode on CPU) or "reference" (XLA).

  Returns:
    (B, N, heads, head_dim_v) in q's dtype.
  """
  _backend.check_impl(impl)
  check_inputs(q, k, v)
  fn = _backend.select(
      impl, reference=_xla, gpu=_cudnn, tpu=_splash,
      interpret=functools.partial(_splash, interpret=True))
  return fn(q, k, v)
