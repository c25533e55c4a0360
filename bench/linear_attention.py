"""Benchmark: linear-attention kernel vs the XLA (einsum / chunked scan) path.

Times `linear_attention(impl="pallas")` at typical DiT shapes (16 heads x 72
= DiT-XL), forward and forward+backward, causal and not, against two XLA
baselines, and prints one JSON line per measurement:
  xla        what a user writes in jnp: non-causal, phi then two einsums in
             the input dtype with f32 accumulation (SANA/LinFusion style);
             causal, the chunked reference (there is no plain einsum form);
  reference  `impl="reference"`: the f32, precision=HIGHEST oracle path.

Roof bytes (the least HBM traffic any implementation needs):
  forward: q, k, v read once and out written once;
  forward+backward: the forward's bytes, plus q, k, v and dout read once and
    dq, dk, dv written once.
GB/s = roof bytes / time; `copy_ratio` divides that by the device's copy
bandwidth measured in the same run (2 x bytes / time of x + 1).

  python bench/linear_attention.py              # GPU/TPU: the full table
  python bench/linear_attention.py --smoke      # tiny, any device
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from timing import copy_bandwidth_gbs, time_bandwidth
from pallas_kernels.linear_attention import BlockSizes
from pallas_kernels.linear_attention import linear_attention

FULL_SHAPES = [(8, n, 16, 72) for n in (1024, 4096, 16384)]
SMOKE_SHAPES = [(1, 70, 2, 24)]


def roof_bytes(q, backward):
  one = q.size * q.dtype.itemsize  # q, k, v, out, dout, dq, ... all alike
  return (4 + 7) * one if backward else 4 * one


def xla_einsum(q, k, v):
  """Non-causal elu linear attention as plain einsums in the input dtype."""
  f32 = jnp.float32
  phi = lambda x: (jax.nn.elu(x.astype(f32)) + 1).astype(x.dtype)
  qf, kf = phi(q), phi(k)
  s = jnp.einsum("bnhd,bnhe->bhde", kf, v, preferred_element_type=f32)
  z = jnp.sum(kf.astype(f32), axis=1)
  num = jnp.einsum("bnhd,bhde->bnhe", qf, s.astype(q.dtype),
                   preferred_element_type=f32)
  den = jnp.einsum("bnhd,bhd->bnh", qf.astype(f32), z) + 1e-6
  return (num / den[..., None]).astype(q.dtype)


def _fn(impl, causal, bs):
  if impl == "xla":
    return xla_einsum

  def f(q, k, v):
    return linear_attention(q, k, v, causal=causal, impl=impl,
                            block_sizes=bs)
  return f


def _fwd_bwd(f):
  # The cotangent is a fixed random-like tensor (not ones) so XLA cannot
  # simplify the backward.
  def run(q, k, v, g):
    out, vjp = jax.vjp(f, q, k, v)
    return vjp(g)
  return run


def run(shapes, dtype, iters, bs, impls, copy_gbs, causals):
  device = jax.devices()[0]
  for shape in shapes:
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, g = (jax.random.normal(kk, shape, jnp.float32).astype(dtype)
                  for kk in ks)
    for causal in causals:
      for backward in (False, True):
        what = "fwd+bwd" if backward else "fwd"
        nbytes = roof_bytes(q, backward)
        times = {}
        for impl in impls:
          if impl == "xla" and causal:  # the XLA path is the reference here
            if "reference" in times:
              times["xla"] = times["reference"]
            continue
          f = _fn(impl, causal, bs)
          fn, args = (_fwd_bwd(f), (q, k, v, g)) if backward else (f, (q, k, v))
          rec = dict(what=f"linear_attention {what}", impl=impl,
                     causal=causal,
                     shape=dict(zip(("batch", "n", "heads", "head_dim"),
                                    shape)),
                     dtype=jnp.dtype(dtype).name, device=device.device_kind,
                     platform=device.platform, jax=jax.__version__)
          if impl == "pallas":
            rec["block_sizes"] = dict(vars(bs))
            if device.platform == "cpu":
              rec["note"] = "interpret mode (no accelerator): not kernel time"
          ms = time_bandwidth(rec, jax.jit(fn), args, iters, nbytes,
                              copy_gbs)
          if ms is None:
            continue
          times[impl] = ms
          for base in ("xla", "reference"):
            if impl not in ("xla", "reference") and base in times:
              rec[f"speedup_vs_{base}"] = round(times[base] / ms, 3)
          print(json.dumps(rec), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes, 2 iterations (runs on CPU)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--shape", action="append", default=None,
                 help="batch,n,heads,head_dim (repeatable)")
  p.add_argument("--causal", default="false,true",
                 help="comma list of false/true")
  p.add_argument("--impls", default="reference,xla,pallas",
                 help="comma list of reference, xla, pallas; baselines "
                 "first so speedups can be computed")
  d = BlockSizes()
  p.add_argument("--block_n", type=int, default=d.block_n)
  p.add_argument("--chunk", type=int, default=d.chunk)
  p.add_argument("--target_programs", type=int, default=d.target_programs)
  p.add_argument("--min_split_rows", type=int, default=d.min_split_rows)
  p.add_argument("--tiles_per_program", type=int, default=d.tiles_per_program)
  p.add_argument("--num_warps", type=int, default=None, help="default: auto")
  p.add_argument("--num_stages", type=int, default=d.num_stages)
  a = p.parse_args()
  if a.shape:
    shapes = [tuple(int(x) for x in s.split(",")) for s in a.shape]
  else:
    shapes = SMOKE_SHAPES if a.smoke else FULL_SHAPES
  iters = 2 if a.smoke else a.iters
  bs = BlockSizes(block_n=a.block_n, chunk=a.chunk,
                  target_programs=a.target_programs,
                  min_split_rows=a.min_split_rows,
                  tiles_per_program=a.tiles_per_program, num_warps=a.num_warps,
                  num_stages=a.num_stages)
  causals = [c.strip().lower() == "true" for c in a.causal.split(",")]
  copy_gbs = copy_bandwidth_gbs((1 << 20) if a.smoke else (1 << 30), iters)
  run(shapes, jnp.dtype(a.dtype), iters, bs, a.impls.split(","), copy_gbs,
      causals)


if __name__ == "__main__":
  main()
