"""pallas_calls of the selective-scan kernels: grids, BlockSpecs, and the
XLA recurrences over time segments between them.

The kernel bodies and the padded layout they expect are described in
selective_scan_kernels.py.

GPU (Triton): grid (batch, channel tiles, splits). The padded time axis is
cut into `splits` segments of `split_chunks` chunks each, run as parallel
programs. With splits == 1 the forward and the backward are one kernel
each, sequential in time per (batch, tile). With splits = S > 1:
  forward
    selective_scan_fwd_local  segments 0..S-2 from a zero state: the end
                              state and the sum of dt per channel (the
                              segment's decay is exp(A * sum dt));
    XLA                       the true initial state of each segment:
                              h_s = decay_{s-1} h_{s-1} + local_{s-1}
                              (associative scan over S-1 elements);
    selective_scan_fwd        every segment from its true initial state:
                              y, the chunk-boundary states (the backward's
                              residuals), the last state (last segment).
  backward
    selective_scan_bwd_local  segments 1..S-1 in reverse from a zero state
                              gradient (segment S-1 from the last-state
                              cotangent): the gradient at the segment start,
                              and the sum of dt;
    XLA                       the state gradient at each segment's end, the
                              transposed recurrence (reverse associative
                              scan over S-1 elements);
    selective_scan_bwd        every segment in reverse from that gradient,
                              recomputing each chunk's states from its saved
                              boundary state (never inverting the
                              recurrence): du, ddelta, dz; dB/dC partial
                              rows per channel tile; dA/dD/dbias partials
                              per (batch, segment), summed by the caller.
TPU (Mosaic): grid (batch, channel tiles, chunks), the chunk axis
"arbitrary" (sequential) with the carry in VMEM scratch; splits is 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _backend
from pallas_kernels import selective_scan_kernels as k
from pallas_kernels import selective_scan_local as loc_k
from pallas_kernels.selective_scan_kernels import Config

F32 = jnp.float32


def _spec(shape, index_map):
  return pl.BlockSpec(shape, index_map)


def _compiler_params(cfg):
  if cfg.interpret:
    return None
  if cfg.backend == "gpu":
    return _backend.gpu_params(cfg.num_warps, cfg.num_stages)
  return _backend.tpu_params("parallel", "parallel", "arbitrary")


def _specs(cfg, dims, reverse=False, local=None):
  """BlockSpecs by role; dims = (batch, Lp, Dp, Np, G, nc, tiles_per_group).

  GPU: grid (batch, tiles, splits); a program's blocks are its segment.
  local="fwd"|"bwd": the grid of a local pass, which skips the last
  (forward) or the first (backward) segment; its per-segment outputs
  (sstate, svec) have splits - 1 entries.
  """
  bsz, lp, dp, np_, _, nc, tpg = dims
  bd, tc = cfg.block_d, cfg.chunk
  if cfg.backend == "gpu":
    seg, ns = cfg.seg, cfg.split_chunks
    shift = 1 if local == "bwd" else 0
    sh = lambda s: s + shift
    return dict(
        grid=(bsz, dp // bd, cfg.splits - (local is not None)),
        seq=_spec((None, seg, bd), lambda b, j, s: (b, sh(s), j)),
        mat=_spec((np_, bd), lambda b, j, s: (0, j)),
        bc=_spec((None, None, seg, np_),
                 lambda b, j, s: (b, jax.lax.div(j, tpg), sh(s), 0)),
        vec=_spec((1, bd), lambda b, j, s: (0, j)),
        last=_spec((None, np_, bd), lambda b, j, s: (b, 0, j)),
        sstate=_spec((None, None, np_, bd), lambda b, j, s: (b, s, 0, j)),
        # Per-boundary states (S - 1 of them): the one a segment starts
        # from (prev) or ends at (next); clamped at the first/last segment,
        # which does not use it.
        prev=_spec((None, None, np_, bd),
                   lambda b, j, s: (b, jax.lax.max(s - 1, 0), 0, j)),
        next=_spec((None, None, np_, bd),
                   lambda b, j, s: (b, jax.lax.min(s, cfg.splits - 2), 0,
                                    j)),
        svec=_spec((None, None, 1, bd), lambda b, j, s: (b, s, 0, j)),
        states=_spec((None, ns, np_, bd), lambda b, j, s: (b, s, 0, j)),
        pbc=_spec((None, None, seg, np_), lambda b, j, s: (b, j, s, 0)),
        work=_spec((None, None, tc, np_, bd),
                   lambda b, j, s: (b, s, 0, 0, j)),
    )
  # TPU: the chunk axis is the sequential third grid axis; the backward
  # walks it in reverse through the index maps.
  ch = (lambda c: nc - 1 - c) if reverse else (lambda c: c)
  return dict(
      grid=(bsz, dp // bd, nc),
      seq=_spec((None, tc, bd), lambda b, j, c: (b, ch(c), j)),
      mat=_spec((np_, bd), lambda b, j, c: (0, j)),
      bc=_spec((None, None, tc, np_),
               lambda b, j, c: (b, jax.lax.div(j, tpg), ch(c), 0)),
      vec=_spec((1, bd), lambda b, j, c: (0, j)),
      last=_spec((None, np_, bd), lambda b, j, c: (b, 0, j)),
      sstate=_spec((None, None, np_, bd), lambda b, j, c: (b, 0, 0, j)),
      svec=_spec((None, None, 1, bd), lambda b, j, c: (b, 0, 0, j)),
      states=_spec((None, None, np_, bd), lambda b, j, c: (b, ch(c), 0, j)),
      pbc=_spec((None, None, tc, np_), lambda b, j, c: (b, j, ch(c), 0)),
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
  assert lp == cfg.splits * cfg.seg, (lp, cfg)
  return (bsz, lp, dp, np_, g, lp // cfg.chunk, dp // g // cfg.block_d)


def _run(cfg, kernel, s, arrays, roles, outs, scratch, name):
  """pallas_call with refs named as in `kernel`'s (in, out) name lists.

  arrays: name -> array; roles: name -> spec role in `s`; outs: list of
  (name, ShapeDtypeStruct, role). Names absent from the config are
  dropped (see selective_scan_kernels.present).
  """
  body, in_names, out_names = kernel
  ins = k.present(cfg, in_names)
  outs = {n: (sds, role) for n, sds, role in outs}
  outs = [(n,) + outs[n] for n in k.present(cfg, out_names)]
  res = _call(cfg, lambda *refs: body(cfg, *refs), s["grid"],
              [arrays[n] for n in ins], [s[roles[n]] for n in ins],
              [o[1] for o in outs], [s[o[2]] for o in outs], scratch, name)
  return dict(zip([o[0] for o in outs], res))


_ROLES = dict(u="seq", delta="seq", z="seq", dy="seq", A="mat", B="bc",
              C="bc", D="vec", bias="vec", init="prev", dend="next",
              dlast="last", states="states")


def _chain(decay, local, reverse=False):
  """Inclusive linear recurrence over axis 1: x_s = decay_s x_{s-1} +
  local_s (from the end when reverse), x = 0 before the first."""

  def combine(x, y):
    (a1, b1), (a2, b2) = x, y
    return a1 * a2, a2 * b1 + b2

  return jax.lax.associative_scan(combine, (decay, local), axis=1,
                                  reverse=reverse)[1]


def _segment_decay(A, dtsum):
  """exp(A * sum dt) per segment: (Np, Dp), (b, S', 1, Dp) -> (b, S', Np, Dp)."""
  return jnp.exp(A[None, None] * dtsum)


def forward(cfg: Config, u, delta, z, A, B, C, D, bias):
  """Padded-layout forward: returns y, last state, boundary states."""
  dims = _dims(cfg, u, B)
  bsz, lp, dp, np_, _, nc, _ = dims
  sds = jax.ShapeDtypeStruct
  arrays = dict(u=u, delta=delta, z=z, A=A, B=B, C=C, D=D, bias=bias)
  if cfg.backend == "gpu" and cfg.splits > 1:
    # Phase 1: every segment but the last from a zero state.
    ns = cfg.splits - 1
    loc = _run(cfg, (loc_k.fwd_local_kernel, loc_k.FWD_LOCAL_IN,
                     loc_k.FWD_LOCAL_OUT),
               _specs(cfg, dims, local="fwd"), arrays, _ROLES,
               [("hloc", sds((bsz, ns, np_, dp), F32), "sstate"),
                ("dtsum", sds((bsz, ns, 1, dp), F32), "svec")],
               [], "selective_scan_fwd_local")
    # Phase 2: true end states of segments 0..S-2 = initial states of 1..S-1
    # (segment s reads entry s - 1).
    arrays["init"] = _chain(_segment_decay(A, loc["dtsum"]), loc["hloc"])
  s = _specs(cfg, dims)
  scratch = ([] if cfg.backend == "gpu" else
             [pltpu.VMEM((np_, cfg.block_d), F32)])
  out = _run(cfg, (k.fwd_kernel, k.FWD_IN, k.FWD_OUT), s, arrays, _ROLES,
             [("y", sds(u.shape, u.dtype), "seq"),
              ("last", sds((bsz, np_, dp), F32), "last"),
              ("states", sds((bsz, nc, np_, dp), F32), "states")],
             scratch, "selective_scan_fwd")
  return out["y"], out["last"], out["states"]


def _state_grads(cfg, dims, arrays, A):
  """Gradient w.r.t. the end state of segments 0..S-2 (b, S-1, Np, Dp)."""
  bsz, _, dp, np_, _, _, _ = dims
  sds = jax.ShapeDtypeStruct
  ns = cfg.splits - 1
  # Every segment but the first, in reverse from a zero gradient (the last
  # one from the last-state cotangent).
  loc = _run(cfg, (loc_k.bwd_local_kernel, loc_k.BWD_LOCAL_IN,
                   loc_k.BWD_LOCAL_OUT),
             _specs(cfg, dims, local="bwd"), arrays, _ROLES,
             [("dhloc", sds((bsz, ns, np_, dp), F32), "sstate"),
              ("dtsum", sds((bsz, ns, 1, dp), F32), "svec")],
             [], "selective_scan_bwd_local")
  # Gradient at the start of segment s (1..S-1) = at the end of s-1:
  #   g_s = dhloc_s + exp(A sum dt_s) g_{s+1}, g_{S-1} = dhloc_{S-1}.
  # Entry s - 1 of the result is g_s: segment s - 1 reads it.
  return _chain(_segment_decay(A, loc["dtsum"]), loc["dhloc"], reverse=True)


def backward(cfg: Config, u, delta, z, A, B, C, D, bias, states, dy, dlast):
  """Padded-layout backward.

  Returns du, ddelta, dz (None without z), partial dA (batch, S, Np, Dp),
  dD and dbias (batch, S, 1, Dp) per batch and segment, and per-channel-
  tile partial dB and dC (batch, tiles, Lp, Np); the caller sums the
  partials (no atomics).
  """
  dims = _dims(cfg, u, B)
  bsz, lp, dp, np_, _, nc, _ = dims
  nt = dp // cfg.block_d
  arrays = dict(u=u, delta=delta, z=z, A=A, B=B, C=C, D=D, bias=bias,
                states=states, dy=dy, dlast=dlast)
  if cfg.backend == "gpu" and cfg.splits > 1:
    arrays["dend"] = _state_grads(cfg, dims, arrays, A)
  s = _specs(cfg, dims, reverse=True)
  ns = cfg.splits
  sds = jax.ShapeDtypeStruct
  outs = [("du", sds(u.shape, u.dtype), "seq"),
          ("ddelta", sds(delta.shape, delta.dtype), "seq"),
          ("dz", sds(u.shape, u.dtype if z is None else z.dtype), "seq"),
          ("dA", sds((bsz, ns, np_, dp), F32), "sstate"),
          ("dD", sds((bsz, ns, 1, dp), F32), "svec"),
          ("dbias", sds((bsz, ns, 1, dp), F32), "svec"),
          ("dB", sds((bsz, nt, lp, np_), F32), "pbc"),
          ("dC", sds((bsz, nt, lp, np_), F32), "pbc")]
  names = list(k.BWD_OUT)
  if cfg.backend == "gpu":
    # Triton has no scratch: the recomputed per-chunk states go to HBM
    # (per program, so it stays partly in L2).
    outs.append(("work", sds((bsz, ns, cfg.chunk, np_, dp), F32), "work"))
    names.append("work")
    scratch = []
  else:
    scratch = [pltpu.VMEM((np_, cfg.block_d), F32),
               pltpu.VMEM((cfg.chunk, np_, cfg.block_d), F32)]
  out = _run(cfg, (k.bwd_kernel, k.BWD_IN, tuple(names)), s, arrays,
             _ROLES, outs, scratch, "selective_scan_bwd")
  return (out["du"], out["ddelta"], out.get("dz"), out["dA"], out["dD"],
          out["dbias"], out["dB"], out["dC"])
