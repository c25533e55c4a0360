"""Benchmark: Mamba-1 selective scan kernel vs the XLA baselines.

Times `selective_scan(impl="pallas")` against the lax.scan reference and
the associative-scan XLA path at typical DiT shapes, forward and
forward+backward, and prints one JSON line per measurement.

Roof bytes (the least HBM traffic any implementation needs):
  forward: every input read once (u, delta, z, B, C, A, D, delta_bias) and
    y written once;
  forward+backward: the forward's bytes, plus every input read again, dy
    read once and every gradient written once.
GB/s = roof bytes / time; `copy_ratio` divides that by the device's copy
bandwidth measured in the same run (2 x bytes / time of x + 1).

The Pallas kernel runs once per `--splits` value (GPU time segments run as
parallel programs; 1 = one sequential program per (batch, channel tile),
auto = enough segments to fill the GPU), each in the same process as the
baselines; records give the resolved config with the number of programs
per pallas_call, and `speedup_vs_pallas_splits1` where splits=1 ran first.

  python bench/scan.py                 # GPU/TPU: the full table
  python bench/scan.py --splits 1,auto,8,32
  python bench/scan.py --smoke         # tiny, any device (CPU: interpret)
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from timing import copy_bandwidth_gbs, time_bandwidth
from pallas_kernels import selective_scan_pallas as ssp
from pallas_kernels.selective_scan import BlockSizes
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_scan import selective_scan_associative
from pallas_kernels.selective_scan import selective_scan_reference

FULL_SHAPES = [(8, length, dim, 1, 16) for length in (1024, 4096)
               for dim in (1536, 2304)] + [(2, 1024, 2304, 1, 16),
                                           (2, 4096, 1536, 1, 16)]
SMOKE_SHAPES = [(2, 160, 24, 1, 4)]  # 3 chunks: auto splits 3


def make_inputs(shape, dtype):
  b, length, dim, groups, state = shape
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  n = lambda k, s, dt=dtype: jax.random.normal(k, s, jnp.float32).astype(dt)
  return (n(ks[0], (b, length, dim)), (0.5 * n(ks[1], (b, length, dim))),
          -jnp.exp(n(ks[2], (dim, state), jnp.float32)),
          n(ks[3], (b, length, groups, state)),
          n(ks[4], (b, length, groups, state)),
          n(ks[5], (dim,), jnp.float32), n(ks[6], (b, length, dim)),
          n(ks[7], (dim,), jnp.float32))


def roof_bytes(args, backward):
  """Minimum HBM bytes (see the module docstring)."""
  inputs = sum(x.size * x.dtype.itemsize for x in args)
  y = args[0].size * args[0].dtype.itemsize
  if not backward:
    return inputs + y
  # Forward, then re-read inputs + dy, write one gradient per input.
  return (inputs + y) + (inputs + y) + inputs


def _pallas_names(splits_list):
  """impl name -> BlockSizes.splits for each --splits value."""
  if len(splits_list) == 1:
    return {"pallas": splits_list[0]}
  return {f"pallas:splits={'auto' if v is None else v}": v
          for v in splits_list}


def _fns(block_sizes, splits_list):
  """name -> f(u, delta, A, B, C, D, z, bias) -> y."""

  def wrap(scan, **extra):
    def f(u, delta, A, B, C, D, z, bias):
      return scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                  delta_softplus=True, **extra)
    return f

  fns = {
      "reference": wrap(selective_scan_reference),
      "associative": wrap(selective_scan_associative),
  }
  for name, splits in _pallas_names(splits_list).items():
    bs = dataclasses.replace(block_sizes, splits=splits)
    fns[name] = wrap(selective_scan, impl="pallas", block_sizes=bs)
  return fns


def _config_record(block_sizes, shape, platform):
  backend = "tpu" if platform == "tpu" else "gpu"
  b, length, dim, groups, _ = shape
  cfg = ssp.make_config(backend, False, True, True, b, length, dim, groups,
                        block_sizes)
  rec = dict(block_d=cfg.block_d, chunk=cfg.chunk, num_warps=cfg.num_warps,
             num_stages=cfg.num_stages, unroll=cfg.unroll)
  if backend == "gpu":
    rec.update(splits=cfg.splits, split_chunks=cfg.split_chunks)
  rec["programs"] = ssp.num_programs(cfg, b, dim, groups)
  return rec


def _fwd_bwd(f):
  def loss(*args):
    return jnp.sum(f(*args).astype(jnp.float32))
  return jax.grad(loss, argnums=tuple(range(8)))


def run(shapes, dtype, iters, block_sizes, impls, splits_list, copy_gbs):
  device = jax.devices()[0]
  fns = _fns(block_sizes, splits_list)
  pallas = _pallas_names(splits_list)
  impls = [n for i in impls for n in (pallas if i == "pallas" else [i])]
  for shape in shapes:
    args = make_inputs(shape, dtype)
    for backward in (False, True):
      what = "fwd+bwd" if backward else "fwd"
      nbytes = roof_bytes(args, backward)
      times = {}
      for name in impls:
        f = _fwd_bwd(fns[name]) if backward else fns[name]
        rec = dict(what=f"selective_scan {what}", impl=name,
                   shape=dict(zip(("batch", "length", "dim", "groups",
                                   "state"), shape)),
                   dtype=jnp.dtype(dtype).name, device=device.device_kind,
                   platform=device.platform, jax=jax.__version__)
        if name in pallas:
          bs = dataclasses.replace(block_sizes, splits=pallas[name])
          rec["config"] = _config_record(bs, shape, device.platform)
          if device.platform == "cpu":
            rec["note"] = "interpret mode (no accelerator): not kernel time"
        ms = time_bandwidth(rec, jax.jit(f), args, iters, nbytes, copy_gbs)
        if ms is None:
          continue
        times[name] = ms
        for base in ("reference", "associative", "pallas:splits=1"):
          if base != name and base in times:
            key = base.replace(":", "_").replace("=", "")
            rec[f"speedup_vs_{key}"] = round(times[base] / ms, 3)
        print(json.dumps(rec), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes, 2 iterations (runs on CPU)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--shape", action="append", default=None,
                 help="batch,length,dim,groups,state (repeatable)")
  p.add_argument("--impls", default="reference,associative,pallas",
                 help="comma list; baselines first so speedups can be "
                 "computed")
  p.add_argument("--block_d", type=int, default=None, help="default: auto")
  p.add_argument("--chunk", type=int, default=BlockSizes.chunk)
  p.add_argument("--num_warps", type=int, default=None, help="default: auto")
  p.add_argument("--num_stages", type=int, default=BlockSizes.num_stages)
  p.add_argument("--unroll", type=int, default=BlockSizes.unroll)
  p.add_argument("--splits", default="1,auto",
                 help="comma list of GPU time splits, each an int or auto; "
                 "the kernel runs once per value")
  a = p.parse_args()
  if a.shape:
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape]
  else:
    shapes = SMOKE_SHAPES if a.smoke else FULL_SHAPES
  iters = 2 if a.smoke else a.iters
  bs = BlockSizes(block_d=a.block_d, chunk=a.chunk, num_warps=a.num_warps,
                  num_stages=a.num_stages, unroll=a.unroll)
  copy_gbs = copy_bandwidth_gbs((1 << 20) if a.smoke else (1 << 30), iters)
  splits = [None if v == "auto" else int(v) for v in a.splits.split(",")]
  run(shapes, jnp.dtype(a.dtype), iters, bs, a.impls.split(","), splits,
      copy_gbs)


if __name__ == "__main__":
  main()
