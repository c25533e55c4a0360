"""pallas_calls of the selective-scan kernels: grids and BlockSpecs.

The kernel bodies and the padded layout they expect are described in
selective_scan_kernels.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _backend
from pallas_kernels.selective_scan_kernels import bwd_kernel
from pallas_kernels.selective_scan_kernels import Config
from pallas_kernels.selective_scan_kernels import fwd_kernel

F32 = jnp.float32


def _spec(shape, index_map):
  return pl.BlockSpec(shape, index_map)


def _compiler_params(cfg):
  if cfg.interpret:
    return None
  if cfg.backend == "gpu":
    return _backend.gpu_params(cfg.num_warps, cfg.num_stages)
  return _backend.tpu_params("parallel", "parallel", "arbitrary")


def _specs(cfg, dims, reverse=False):
  """BlockSpecs by role; dims = (batch, Lp, Dp, Np, G, nc, tiles_per_group)."""
  bsz, lp, dp, np_, _, nc, tpg = dims
  bd, tc = cfg.block_d, cfg.chunk
  if cfg.backend == "gpu":
    return dict(
        grid=(bsz, dp // bd),
        seq=_spec((None, lp, bd), lambda b, j: (b, 0, j)),
        mat=_spec((np_, bd), lambda b, j: (0, j)),
        bc=_spec((None, None, lp, np_),
                 lambda b, j: (b, jax.lax.div(j, tpg), 0, 0)),
        vec=_spec((1, bd), lambda b, j: (0, j)),
        state=_spec((None, np_, bd), lambda b, j: (b, 0, j)),
        states=_spec((None, nc, np_, bd), lambda b, j: (b, 0, 0, j)),
        pvec=_spec((None, 1, bd), lambda b, j: (b, 0, j)),
        pbc=_spec((None, None, lp, np_), lambda b, j: (b, j, 0, 0)),
        work=_spec((None, tc, np_, bd), lambda b, j: (b, 0, 0, j)),
    )
  # TPU: the chunk axis is the sequential third grid axis; the backward
  # walks it in reverse through the index maps.
  ch = (lambda k: nc - 1 - k) if reverse else (lambda k: k)
  return dict(
      grid=(bsz, dp // bd, nc),
      seq=_spec((None, tc, bd), lambda b, j, k: (b, ch(k), j)),
      mat=_spec((np_, bd), lambda b, j, k: (0, j)),
      bc=_spec((None, None, tc, np_),
               lambda b, j, k: (b, jax.lax.div(j, tpg), ch(k), 0)),
      vec=_spec((1, bd), lambda b, j, k: (0, j)),
      state=_spec((None, np_, bd), lambda b, j, k: (b, 0, j)),
      states=_spec((None, None, np_, bd), lambda b, j, k: (b, ch(k), 0, j)),
      pvec=_spec((None, 1, bd), lambda b, j, k: (b, 0, j)),
      pbc=_spec((None, None, tc, np_), lambda b, j, k: (b, j, ch(k), 0)),
  )


def _call(cfg, kernel, grid, args, in_specs, out_shape, out_specs, scratch,
          name):
  """Named pallas_call.

  With cfg.poison every output starts as NaN (an aliased input), so a test
  can prove that the kernel writes each element.
  """
  n_args, n_out = len(args), len(out_shape)
  aliases = {}
  body = kernel
  if cfg.poison:
    args = list(args) + [jnp.full(o.shape, jnp.nan, o.dtype)
                         for o in out_shape]
    in_specs = list(in_specs) + list(out_specs)
    aliases = {n_args + i: i for i in range(n_out)}
    body = lambda *r: kernel(*(r[:n_args] + r[n_args + n_out:]))
  return pl.pallas_call(
      body,
      out_shape=tuple(out_shape),
      grid=grid,
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      scratch_shapes=scratch,
      input_output_aliases=aliases,
      interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg),
      name=name,
  )(*args)


def _dims(cfg, u, B):
  bsz, lp, dp = u.shape
  _, g, _, np_ = B.shape
  return (bsz, lp, dp, np_, g, lp // cfg.chunk, dp // g // cfg.block_d)


def forward(cfg: Config, u, delta, z, A, B, C, D, bias):
  """Padded-layout forward: returns y, last state and boundary states."""
  dims = _dims(cfg, u, B)
  bsz, lp, dp, np_, _, nc, _ = dims
  s = _specs(cfg, dims)
  args = [u, delta] + ([z] if cfg.has_z else []) + [A, B, C, D, bias]
  in_specs = [s["seq"], s["seq"]] + ([s["seq"]] if cfg.has_z else [])
  in_specs += [s["mat"], s["bc"], s["bc"], s["vec"], s["vec"]]
  out_shape = (jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct((bsz, np_, dp), F32),
               jax.ShapeDtypeStruct((bsz, nc, np_, dp), F32))
  scratch = ([] if cfg.backend == "gpu" else
             [pltpu.VMEM((np_, cfg.block_d), F32)])
  kernel = lambda *refs: fwd_kernel(cfg, nc, *refs)
  return _call(cfg, kernel, s["grid"], args, in_specs, out_shape,
               (s["seq"], s["state"], s["states"]), scratch,
               "selective_scan_fwd")


def backward(cfg: Config, u, delta, z, A, B, C, D, bias, states, dy, dlast):
  """Padded-layout backward.

  Returns du, ddelta, dz (None without z), per-batch partial dA (batch, Np,
  Dp), dD and dbias (batch, 1, Dp), and per-channel-tile partial dB and dC
  (batch, tiles, Lp, Np); the caller sums the partials (no atomics).
  """
  dims = _dims(cfg, u, B)
  bsz, lp, dp, np_, _, nc, _ = dims
  nt = dp // cfg.block_d
  s = _specs(cfg, dims, reverse=True)
  args = [u, delta] + ([z] if cfg.has_z else [])
  args += [A, B, C, D, bias, states, dy, dlast]
  in_specs = [s["seq"], s["seq"]] + ([s["seq"]] if cfg.has_z else [])
  in_specs += [s["mat"], s["bc"], s["bc"], s["vec"], s["vec"], s["states"],
               s["seq"], s["state"]]
  sds = jax.ShapeDtypeStruct
  out_shape = [sds(u.shape, u.dtype), sds(delta.shape, delta.dtype)]
  out_specs = [s["seq"], s["seq"]]
  if cfg.has_z:
    out_shape.append(sds(z.shape, z.dtype))
    out_specs.append(s["seq"])
  out_shape += [sds((bsz, np_, dp), F32), sds((bsz, 1, dp), F32),
                sds((bsz, 1, dp), F32), sds((bsz, nt, lp, np_), F32),
                sds((bsz, nt, lp, np_), F32)]
  out_specs += [s["state"], s["pvec"], s["pvec"], s["pbc"], s["pbc"]]
  if cfg.backend == "gpu":
    # Triton has no scratch: the recomputed per-chunk states go to HBM
    # (per program, so it stays mostly in L2).
    out_shape.append(sds((bsz, cfg.chunk, np_, dp), F32))
    out_specs.append(s["work"])
    scratch = []
  else:
    scratch = [pltpu.VMEM((np_, cfg.block_d), F32),
               pltpu.VMEM((cfg.chunk, np_, cfg.block_d), F32)]
  kernel = lambda *refs: bwd_kernel(cfg, nc, *refs)
  outs = _call(cfg, kernel, s["grid"], args, in_specs, out_shape, out_specs,
               scratch, "selective_scan_bwd")
  outs = list(outs)
  du, ddelta = outs[:2]
  dz = outs[2] if cfg.has_z else None
  rest = outs[3 if cfg.has_z else 2:]
  return (du, ddelta, dz) + tuple(rest[:5])
