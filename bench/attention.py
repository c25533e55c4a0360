"""Benchmark: local (windowed) attention vs dense attention.

Prints one JSON line per measurement: local attention (pallas_kernels), dense
attention without a mask (cuDNN on GPU and splash attention on TPU when they
accept the inputs, as jdit's attention mixer runs it, else XLA) and dense
attention with the window as an explicit mask, forward and forward+backward,
for several grids and radii.

Fields: what, mode (fwd | fwd_bwd), shape, device, jax, time_ms (median),
tflops (effective: FLOPs of the visible query/key pairs only, i.e. the
unmasked FLOPs, per second; backward counted as 2.5x forward;
tflops_dense_equiv counts all N^2 pairs instead), visited
(fraction of key blocks the kernel visits), speedup (dense time / time) and,
for the kernel, target_ratio = time / (dense time x visited fraction): 1.0
means the kernel runs as fast per visited block as dense attention.

GPU:  python bench/attention.py
CPU:  python bench/attention.py --smoke   (tiny sizes, interpret mode)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from timing import time_ms
from pallas_kernels import dot_product_attention
from pallas_kernels.local_attention import (BlockSizes, local_attention,
                                            visited_fraction)


def _visible_pairs(grid, window, shape):
  """Exact number of (query, key) pairs inside the window."""
  coords = np.stack(np.unravel_index(np.arange(np.prod(grid)), grid), -1)
  total = 0
  for start in range(0, len(coords), 1024):  # bounded memory
    off = coords[start:start + 1024, None] - coords[None]
    vis = ((off ** 2).sum(-1) <= window ** 2 if shape == "circle"
           else np.abs(off).max(-1) <= window)
    total += int(vis.sum())
  return total


def _window_mask(grid, window, shape):
  coords = jnp.stack(jnp.unravel_index(jnp.arange(int(np.prod(grid))), grid),
                     -1)
  off = coords[:, None] - coords[None]
  if shape == "circle":
    return jnp.sum(off * off, -1) <= window ** 2
  return jnp.max(jnp.abs(off), -1) <= window


def _dense(implementation, mask=None):
  if implementation == "splash":  # TPU: what jdit's attention mixer runs
    return functools.partial(dot_product_attention, impl="pallas")

  def f(q, k, v):
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[None, None],
        implementation=implementation)
  return f


def _with_grad(f):
  def loss(q, k, v):
    return jnp.sum(f(q, k, v).astype(jnp.float32))
  return jax.jit(jax.grad(loss, (0, 1, 2)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny CPU run (kernel in interpret mode)")
  p.add_argument("--grids", default="32x32,64x64,128x128")
  p.add_argument("--radii", default="2,4,8,16")
  p.add_argument("--shape", default="circle", choices=["circle", "square"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=72)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--no_masked", action="store_true",
                 help="skip dense attention with an explicit mask")
  p.add_argument("--tile", default="", help="e.g. 8x16 (tuning)")
  for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd",
               "num_warps", "num_stages"):
    p.add_argument(f"--{name}", type=int, default=None, help="tuning")
  args = p.parse_args()
  if args.smoke:
    args.grids, args.radii = "8x16", "2"
    args.batch, args.heads, args.head_dim = 1, 2, 32
    args.dtype, args.warmup, args.iters = "float32", 1, 2

  tuning = {n: getattr(args, n) for n in (
      "block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps",
      "num_stages") if getattr(args, n) is not None}
  if args.tile:
    tuning["tile"] = tuple(int(x) for x in args.tile.split("x"))
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  dtype = jnp.dtype(args.dtype)
  impl = "auto" if dev.platform in ("gpu", "tpu") else "pallas"
  base = dict(device=dev.device_kind, platform=dev.platform,
              jax=jax.__version__, tuning={
                  k: list(v) if isinstance(v, tuple) else v
                  for k, v in tuning.items()})

  def emit(**kw):
    print(json.dumps({**kw, **base}), flush=True)

  for gs in args.grids.split(","):
    grid = tuple(int(x) for x in gs.split("x"))
    n = int(np.prod(grid))
    shp = (args.batch, n, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(x, shp, jnp.float32).astype(dtype)
               for x in keys)
    fwd_flops_dense = 4.0 * args.batch * args.heads * n * n * args.head_dim
    shape_info = dict(grid=list(grid), batch=args.batch, heads=args.heads,
                      head_dim=args.head_dim, dtype=str(dtype))

    # Dense ceiling: cuDNN on GPU, splash on TPU, when they take the
    # inputs, else XLA.
    dense_impl, dense_ms = None, {}
    first = {"gpu": ["cudnn"], "tpu": ["splash"]}.get(dev.platform, [])
    for cand in first + [None]:
      try:
        f = jax.jit(_dense(cand))
        dense_ms = {"fwd": time_ms(f, (q, k, v), args.iters, args.warmup),
                    "fwd_bwd": time_ms(_with_grad(_dense(cand)), (q, k, v),
                                        args.iters, args.warmup)}
        dense_impl = cand or "xla"
        break
      except Exception as e:  # pylint: disable=broad-except
        emit(what="dense", error=f"{cand}: {type(e).__name__}: {e}"[:300])
    for mode, ms in dense_ms.items():
      mult = 1.0 if mode == "fwd" else 3.5
      emit(what=f"dense_{dense_impl}", mode=mode, shape=shape_info,
           time_ms=ms, tflops=mult * fwd_flops_dense / ms / 1e9,
           visited=1.0, speedup=1.0)

    for r in (int(x) for x in args.radii.split(",")):
      pairs = _visible_pairs(grid, r, args.shape)
      flops = 4.0 * args.batch * args.heads * pairs * args.head_dim
      bs = BlockSizes.get_default("tpu" if dev.platform == "tpu" else "gpu")
      bs = dataclasses.replace(bs, **tuning)
      vis_fwd, vis_bwd = visited_fraction(
          grid, r, args.shape, bs,
          "tpu" if dev.platform == "tpu" else "gpu")
      # fwd+bwd: forward is 1 of the 3.5 FLOP units, backward 2.5.
      visited = {"fwd": vis_fwd,
                 "fwd_bwd": (vis_fwd + 2.5 * vis_bwd) / 3.5}
      info = dict(shape_info, window=r, window_shape=args.shape,
                  visible_fraction=pairs / n / n)
      local = functools.partial(local_attention, grid_shape=grid, window=r,
                                shape=args.shape, impl=impl,
                                block_sizes=bs if tuning else None)
      cases = [("local_attention", [local])]
      if not args.no_masked:
        mask = _window_mask(grid, r, args.shape)
        # cuDNN with an explicit mask first (slow but the usual user path).
        cases.append(("dense_masked", [
            _dense(c, mask) for c in (["cudnn", None] if on_gpu else [None])
        ]))
      for what, fs in cases:
        for mode in ("fwd", "fwd_bwd"):
          ms = None
          for f in fs:
            fn = jax.jit(f) if mode == "fwd" else _with_grad(f)
            try:
              ms = time_ms(fn, (q, k, v), args.iters, args.warmup)
              break
            except Exception as e:  # pylint: disable=broad-except
              emit(what=what, mode=mode, shape=info,
                   error=f"{type(e).__name__}: {e}"[:300])
          if ms is None:
            continue
          mult = 1.0 if mode == "fwd" else 3.5
          rec = dict(what=what, mode=mode, shape=info, time_ms=ms,
                     tflops=mult * flops / ms / 1e9,
                     tflops_dense_equiv=mult * fwd_flops_dense / ms / 1e9)
          if mode in dense_ms:
            rec["speedup"] = dense_ms[mode] / ms
          if what == "local_attention":
            rec["visited"] = visited[mode]
            if mode in dense_ms:
              rec["target_ratio"] = ms / (dense_ms[mode] * visited[mode])
          emit(**rec)


if __name__ == "__main__":
  main()
