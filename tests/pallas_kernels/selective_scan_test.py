"""Tests for pallas_kernels.selective_scan (Mamba-1).

Tiers (DESIGN.md): the f32 reference against an independent float64
per-timestep numpy loop; the associative-scan path against the reference;
the Pallas kernels in interpret mode (the Triton program structure, with
the time axis in one sequential pass or split into parallel segments, and
the TPU one) against the reference, forward and all gradients; poisoned
outputs; jax.export lowering to ("cuda",) and ("tpu",) at production shapes;
a real-GPU test (marked gpu).

Tolerances, as max|x - ref| / max|ref| (per output / per gradient):
  f32 reference vs float64 numpy loop: 1e-5.
  f32 kernel (interpret) vs f32 reference: 2e-5 (seen: ~1e-6).
  bf16 inputs, kernel vs the f32 reference on the same inputs: 1e-2
  forward, 2e-2 gradients (the kernel rounds y/du/ddelta/dz to bf16).
  real GPU (f32): 1e-4.
"""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import export_for
from pallas_kernels import selective_scan_calls as ssc
from pallas_kernels import selective_scan_kernels as ssk
from pallas_kernels import selective_scan_pallas as ssp

# The package re-exports the function under the module's name.
ss = importlib.import_module("pallas_kernels.selective_scan")

# Small tiles: tiny shapes still span several channel tiles per group,
# several chunks, left time padding and channel padding. Splits are auto
# (the default is 1): on these shapes every chunk is its own segment.
SMALL = ss.BlockSizes(block_d=16, chunk=16, unroll=2, splits=None)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(b, length, dim, groups, state, dtype=jnp.float32, seed=0):
  """Random arrays in the ranges Mamba uses (A < 0, moderate delta)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  n = lambda k, s: jax.random.normal(k, s, jnp.float32)
  return dict(
      u=n(ks[0], (b, length, dim)).astype(dtype),
      delta=(0.5 * n(ks[1], (b, length, dim))).astype(dtype),
      A=-jnp.exp(0.5 * n(ks[2], (dim, state))),
      B=n(ks[3], (b, length, groups, state)).astype(dtype),
      C=n(ks[4], (b, length, groups, state)).astype(dtype),
      D=n(ks[5], (dim,)),
      z=n(ks[6], (b, length, dim)).astype(dtype),
      delta_bias=0.5 * n(ks[7], (dim,)),
  )


def _numpy_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
  """float64 oracle: the recurrence written out one timestep at a time."""
  f = lambda x: None if x is None else np.asarray(x, np.float64)
  u, delta, A, B, C, D, z, bias = map(f, (u, delta, A, B, C, D, z,
                                          delta_bias))
  b, length, dim = u.shape
  groups, state = B.shape[2:]
  group_of = np.arange(dim) // (dim // groups)
  dt = delta + (0 if bias is None else bias)
  if softplus:
    dt = np.log1p(np.exp(dt))
  h = np.zeros((b, dim, state))
  y = np.zeros((b, length, dim))
  for t in range(length):
    bt, ct = B[:, t][:, group_of], C[:, t][:, group_of]  # (b, dim, N)
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * bt
    y[:, t] = np.sum(h * ct, axis=-1)
  if D is not None:
    y = y + u * D
  if z is not None:
    y = y * z / (1 + np.exp(-z))
  return y, h


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30)


def _assert_rel(x, ref, tol, what):
  err = _rel_err(x, ref)
  assert err <= tol, f"{what}: rel err {err:.3g} > {tol}"


# (b, L, dim, groups, state, use D, use z, use bias, softplus)
CASES = [
    (2, 37, 20, 2, 4, True, True, True, True),
    (1, 50, 40, 2, 16, False, True, False, True),
    (2, 19, 8, 1, 1, True, False, True, False),
    (1, 33, 24, 1, 16, False, False, False, False),
]


def _kwargs(arrs, use_d, use_z, use_bias, softplus):
  return dict(D=arrs["D"] if use_d else None, z=arrs["z"] if use_z else None,
              delta_bias=arrs["delta_bias"] if use_bias else None,
              delta_softplus=softplus)


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_numpy_loop(case):
  b, length, dim, groups, state, *flags = case
  arrs = _inputs(b, length, dim, groups, state)
  kw = _kwargs(arrs, *flags)
  y, last = ss.selective_scan_reference(
      arrs["u"], arrs["delta"], arrs["A"], arrs["B"], arrs["C"],
      return_last_state=True, **kw)
  y64, last64 = _numpy_scan(arrs["u"], arrs["delta"], arrs["A"], arrs["B"],
                            arrs["C"], kw["D"], kw["z"], kw["delta_bias"],
                            kw["delta_softplus"])
  assert y.shape == (b, length, dim) and y.dtype == jnp.float32
  assert last.shape == (b, dim, state) and last.dtype == jnp.float32
  _assert_rel(y, y64, 1e-5, "y")
  _assert_rel(last, last64, 1e-5, "last state")


@pytest.mark.parametrize("case", CASES[:2])
def test_associative_matches_reference(case):
  b, length, dim, groups, state, *flags = case
  arrs = _inputs(b, length, dim, groups, state, seed=1)
  kw = _kwargs(arrs, *flags)
  pos = [arrs[k] for k in NAMES[:5]]
  y, last = ss.selective_scan_associative(*pos, return_last_state=True, **kw)
  y_ref, last_ref = ss.selective_scan_reference(*pos, return_last_state=True,
                                                **kw)
  _assert_rel(y, y_ref, 2e-5, "y")
  _assert_rel(last, last_ref, 2e-5, "last state")


def _fwd_and_grads(fn, arrs, kw, seed=3):
  """y, last state and the grads of a random projection of both."""
  names = [k for k in NAMES if k in ("u", "delta", "A", "B", "C")
           or kw.get(k) is not None]
  kw = {k: v for k, v in kw.items() if k not in names}
  wy, wl = None, None

  def loss(*xs):
    nonlocal wy, wl
    out = fn(**dict(zip(names, xs)), **kw)
    y, last = out if isinstance(out, tuple) else (out, None)
    if wy is None:
      ky, kl = jax.random.split(jax.random.PRNGKey(seed))
      wy = jax.random.normal(ky, y.shape, jnp.float32)
      wl = (None if last is None else
            jax.random.normal(kl, last.shape, jnp.float32))
    value = jnp.sum(y.astype(jnp.float32) * wy)
    if last is not None:
      value = value + jnp.sum(last * wl)
    return value, (y, last)

  xs = [arrs[k] for k in names]
  # One jit per case: far cheaper than op-by-op dispatch in interpret mode.
  grads, (y, last) = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs))),
                                      has_aux=True))(*xs)
  return y, last, dict(zip(names, grads))


def _check_against_reference(run, arrs, kw, tol_fwd, tol_grad,
                             last_state=True):
  ref = lambda **a: ss.selective_scan_reference(return_last_state=last_state,
                                                **a)
  y, last, grads = _fwd_and_grads(run, arrs, kw)
  y_ref, last_ref, grads_ref = _fwd_and_grads(ref, arrs, kw)
  assert y.shape == y_ref.shape and y.dtype == arrs["u"].dtype
  _assert_rel(y, y_ref, tol_fwd, "y")
  assert (last is None) == (not last_state)
  if last_state:
    assert last.shape == last_ref.shape and last.dtype == jnp.float32
    _assert_rel(last, last_ref, tol_fwd, "last state")
  assert grads.keys() == grads_ref.keys()
  for name, g in grads.items():
    assert g.shape == arrs[name].shape and g.dtype == arrs[name].dtype, name
    _assert_rel(g, grads_ref[name], tol_grad, f"d{name}")


@pytest.mark.parametrize("case", CASES)
def test_interpret_matches_reference_f32(case):
  b, length, dim, groups, state, *flags = case
  arrs = _inputs(b, length, dim, groups, state, seed=2)
  run = lambda **a: ss.selective_scan(return_last_state=True, impl="pallas",
                                      block_sizes=SMALL, **a)
  _check_against_reference(run, arrs, _kwargs(arrs, *flags), 2e-5, 2e-5)


def test_interpret_matches_reference_bf16():
  arrs = _inputs(2, 45, 40, 2, 16, dtype=jnp.bfloat16, seed=4)
  run = lambda **a: ss.selective_scan(return_last_state=True, impl="pallas",
                                      block_sizes=SMALL, **a)
  kw = _kwargs(arrs, True, True, True, True)
  _check_against_reference(run, arrs, kw, 1e-2, 2e-2)


@pytest.mark.parametrize("chunk,unroll,block_d,splits",
                         [(8, 1, 8, None), (32, 8, 64, 1)])
def test_interpret_block_sizes(chunk, unroll, block_d, splits):
  arrs = _inputs(1, 40, 48, 1, 4, seed=5)
  bs = ss.BlockSizes(block_d=block_d, chunk=chunk, unroll=unroll,
                     splits=splits)
  run = lambda **a: ss.selective_scan(return_last_state=True, impl="pallas",
                                      block_sizes=bs, **a)
  kw = _kwargs(arrs, True, True, True, True)
  _check_against_reference(run, arrs, kw, 2e-5, 2e-5)


# Chunk-parallel GPU structure (chunk 8): (b, L, dim, groups, state, use D,
# use z, use bias, softplus, splits asked, splits used, return_last_state).
# (splits=1, the sequential structure: test_interpret_block_sizes and the
# poison test.)
SPLIT_CASES = [
    # L % chunk != 0 (left time padding), padded channels per group.
    (2, 37, 12, 2, 4, True, True, False, True, 2, 2, True),
    # State 1, no z, y only (zero last-state cotangent); 6 chunks in 3.
    (1, 45, 16, 1, 1, False, False, True, False, 3, 3, False),
    # One chunk per segment, groups 2, state 16.
    (2, 64, 16, 2, 16, True, False, True, True, 8, 8, True),
    # 7 chunks asked in 4 segments: 2 per segment, so 4 (8 chunks, padded).
    (1, 50, 24, 1, 4, False, True, True, False, 4, 4, False),
]


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_interpret_splits_match_reference(case):
  b, length, dim, groups, state, *flags, splits, used, last_state = case
  arrs = _inputs(b, length, dim, groups, state, seed=10)
  if not flags[3]:  # without softplus keep dt > 0 (else h grows to inf)
    arrs["delta"] = jnp.abs(arrs["delta"])
    arrs["delta_bias"] = jnp.abs(arrs["delta_bias"])
  bs = ss.BlockSizes(block_d=8, chunk=8, unroll=2, splits=splits)
  cfg = ssp.make_config("gpu", True, flags[3], flags[1], b, length, dim,
                        groups, bs)
  assert cfg.splits == used
  assert cfg.splits * cfg.seg >= length > (cfg.splits - 1) * cfg.seg
  run = lambda **a: ss.selective_scan(return_last_state=last_state,
                                      impl="pallas", block_sizes=bs, **a)
  _check_against_reference(run, arrs, _kwargs(arrs, *flags), 2e-5, 2e-5,
                           last_state=last_state)


@pytest.mark.parametrize("shape,splits,per,block_d", [
    # bench shapes: batch x tiles x splits >= 8 x 132 programs
    ((8, 1024, 2304, 1), 4, 4, 64),
    ((2, 4096, 1536, 1), 32, 2, 64),
    ((2, 1024, 2304, 1), 16, 1, 64),
    # already enough programs: one sequential pass
    ((64, 1024, 2304, 1), 1, 16, 64),
    # one chunk: nothing to split, so the sequential rule halves block_d
    ((2, 64, 1536, 1), 1, 1, 32),
])
def test_auto_splits(shape, splits, per, block_d):
  b, length, dim, groups = shape
  cfg = ssp.make_config("gpu", False, True, True, b, length, dim, groups,
                        ss.BlockSizes(splits=None))
  assert (cfg.splits, cfg.split_chunks, cfg.block_d) == (splits, per, block_d)
  n = ssp.num_programs(cfg, b, dim, groups)
  assert n == b * dim // block_d * splits
  assert splits == 1 or n >= 8 * 132


def test_splits_one_is_the_sequential_config():
  # splits=1 keeps the pre-split choice: block_d 32 when 64 would leave
  # SMs idle; TPU ignores splits.
  one = ss.BlockSizes(splits=1)
  cfg = ssp.make_config("gpu", False, True, True, 2, 4096, 1536, 1, one)
  assert (cfg.splits, cfg.split_chunks, cfg.block_d) == (1, 64, 32)
  tpu = ssp.make_config("tpu", False, True, True, 2, 4096, 1536, 1,
                        ss.BlockSizes(splits=8))
  assert (tpu.splits, tpu.split_chunks) == (1, 64)
  with pytest.raises(ValueError, match="splits"):
    ssp.make_config("gpu", False, True, True, 2, 64, 8, 1,
                    ss.BlockSizes(splits=0))


def _tpu_structured(softplus):
  """The Mosaic program structure (chunk grid axis, VMEM scratch carries),
  run in interpret mode."""

  def run(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    cfg = ssp.make_config("tpu", True, softplus, z is not None, u.shape[0],
                          u.shape[1], u.shape[2], B.shape[2],
                          ss.BlockSizes(chunk=16, unroll=2))
    zeros = jnp.zeros((u.shape[2],), jnp.float32)
    return ssp.scan(cfg, u, delta, A, B, C, zeros if D is None else D, z,
                    zeros if delta_bias is None else delta_bias)

  return run


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_tpu_structure_interpret_matches_reference(case):
  b, length, dim, groups, state, *flags = case
  arrs = _inputs(b, length, dim, groups, state, seed=6)
  kw = _kwargs(arrs, *flags)
  softplus = kw.pop("delta_softplus")
  run = _tpu_structured(softplus)
  ref_kw = dict(kw, delta_softplus=softplus)
  ref = lambda **a: ss.selective_scan_reference(return_last_state=True, **a)
  y, last, grads = _fwd_and_grads(run, arrs, kw)
  y_ref, last_ref, grads_ref = _fwd_and_grads(ref, arrs, ref_kw)
  _assert_rel(y, y_ref, 2e-5, "y")
  _assert_rel(last, last_ref, 2e-5, "last state")
  for name, g in grads.items():
    _assert_rel(g, grads_ref[name], 2e-5, f"d{name}")


def test_poison_control_detects_unwritten_output():
  """The poison mechanism itself: an output the kernel skips stays NaN."""
  from jax.experimental import pallas as pl
  cfg = ssk.Config(backend="gpu", interpret=True, softplus=False,
                   has_z=False, block_d=8, chunk=8, poison=True)

  def kernel(x_ref, o_ref):
    o_ref[pl.ds(0, 1), :] = x_ref[pl.ds(0, 1), :]

  spec = pl.BlockSpec((8, 8), lambda i: (0, i))
  (out,) = ssc._call(cfg, kernel, (2,), [jnp.ones((8, 16))], [spec],
                     [jax.ShapeDtypeStruct((8, 16), jnp.float32)], [spec], [],
                     "control")
  assert not np.isnan(out[0]).any() and np.isnan(out[1:]).all()


@pytest.mark.parametrize("backend,splits",
                         [("gpu", None), ("gpu", 1), ("tpu", None)])
@pytest.mark.parametrize("has_z", [True, False])
def test_poisoned_outputs_fully_written(backend, splits, has_z):
  """Every element of every kernel output (padding included) is written."""
  arrs = _inputs(2, 37, 20, 2, 4, seed=7)
  bs = dataclasses.replace(SMALL, splits=splits)
  cfg = ssp.make_config(backend, True, True, has_z, 2, 37, 20, 2, bs)
  assert cfg.splits == (3 if backend == "gpu" and splits is None else 1)
  cfg = dataclasses.replace(cfg, poison=True)
  z = arrs["z"] if has_z else None
  _, args = ssp._prepare(cfg, arrs["u"], arrs["delta"], arrs["A"], arrs["B"],
                         arrs["C"], arrs["D"], z, arrs["delta_bias"])
  y, last, states = ssc.forward(cfg, *args)
  grads = ssc.backward(cfg, *args, states, y, last)
  outs = [y, last, states] + [g for g in grads if g is not None]
  assert len(outs) == 3 + 7 + has_z
  for i, o in enumerate(outs):
    assert np.isfinite(np.asarray(o, np.float32)).all(), f"output {i}"


def test_auto_on_cpu_is_reference():
  arrs = _inputs(2, 21, 8, 1, 4, seed=8)
  pos = [arrs[k] for k in NAMES[:5]]
  kw = _kwargs(arrs, True, True, True, True)
  y = ss.selective_scan(*pos, **kw)
  y_ref = ss.selective_scan_reference(*pos, **kw)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)


# Production shapes: (batch, length, dim, groups, state).
PRODUCTION = {
    "LaMamba-Diff-XL": (2, 1024, 2304, 1, 16),
    "DiM": (2, 4096, 1536, 1, 16),
}


def _export(platform, model, grad, block_sizes=None):
  """MLIR text of the forward (or its gradient) exported for `platform`."""
  b, length, dim, groups, state = PRODUCTION[model]
  bf, f32 = jnp.bfloat16, jnp.float32
  sds = jax.ShapeDtypeStruct
  seq, bc = sds((b, length, dim), bf), sds((b, length, groups, state), bf)
  args = (seq, seq, sds((dim, state), f32), bc, bc, sds((dim,), f32), seq,
          sds((dim,), f32))

  def fwd(u, delta, A, B, C, D, z, bias):
    return ss.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                             delta_softplus=True, return_last_state=True,
                             block_sizes=block_sizes)

  def loss(*xs):
    y, last = fwd(*xs)
    return jnp.sum(y.astype(f32)) + jnp.sum(last)

  fn = jax.grad(loss, argnums=tuple(range(8))) if grad else fwd
  return export_for(jax.jit(fn), platform, *args).mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("model", sorted(PRODUCTION))
@pytest.mark.parametrize("grad", [False, True])
def test_lowering(platform, model, grad):
  # Auto splits (the default, 1, is lowered by test_lowering_cuda_splits).
  text = _export(platform, model, grad, ss.BlockSizes(splits=None))
  if platform == "cuda":
    # Auto splits > 1 at both shapes: the local passes run too.
    assert text.count("__gpu$xla.gpu.triton") == (4 if grad else 2)
    assert "mosaic_gpu" not in text
    assert "selective_scan_fwd_local" in text
    assert ("selective_scan_bwd_local" in text) == grad
  else:
    assert text.count("tpu_custom_call") == (2 if grad else 1)
    assert "_local" not in text
  assert "selective_scan_fwd" in text
  assert ("selective_scan_bwd" in text) == grad


@pytest.mark.parametrize("splits,n_kernels", [(1, 2), (6, 4)])
def test_lowering_cuda_splits(splits, n_kernels):
  """Forward and backward lower with one sequential pass and with segments
  of 3 chunks (192 rows: blocks that are not a power of two)."""
  text = _export("cuda", "LaMamba-Diff-XL", True,
                 ss.BlockSizes(splits=splits))
  assert text.count("__gpu$xla.gpu.triton") == n_kernels
  assert ("_local" in text) == (splits > 1)


@pytest.mark.parametrize("bad,match", [
    (dict(u=jnp.zeros((2, 8))), "u must be"),
    (dict(delta=jnp.zeros((2, 8, 5))), "delta must have shape"),
    (dict(A=jnp.zeros((3, 4))), r"A must be \(dim, state\)"),
    (dict(A=jnp.zeros((6, 0))), "state size > 0"),
    (dict(B=jnp.zeros((2, 8, 1, 3))), "B must be"),
    (dict(B=jnp.zeros((2, 8, 4, 4)), C=jnp.zeros((2, 8, 4, 4))),
     "divisible by groups"),
    (dict(C=jnp.zeros((2, 8, 2, 4))), "C must have shape"),
    (dict(D=jnp.zeros((5,))), "D must have shape"),
    (dict(z=jnp.zeros((2, 8, 5))), "z must have shape"),
    (dict(delta_bias=jnp.zeros((6, 1))), "delta_bias must have shape"),
    (dict(u=jnp.zeros((2, 8, 6), jnp.int32)), "u must be a floating"),
    (dict(impl="triton"), "impl must be one of"),
])
def test_bad_input_raises(bad, match):
  args = dict(u=jnp.zeros((2, 8, 6)), delta=jnp.zeros((2, 8, 6)),
              A=jnp.zeros((6, 4)), B=jnp.zeros((2, 8, 1, 4)),
              C=jnp.zeros((2, 8, 1, 4)))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    ss.selective_scan(**args)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("splits", [None, 1])
@pytest.mark.parametrize("dtype,tol_fwd,tol_grad", [
    (jnp.float32, 1e-4, 1e-4), (jnp.bfloat16, 1e-2, 2e-2)])
def test_gpu_matches_reference(dtype, tol_fwd, tol_grad, splits):
  arrs = _inputs(2, 1000, 320, 2, 16, dtype=dtype, seed=9)
  bs = ss.BlockSizes(splits=splits)
  run = lambda **a: ss.selective_scan(return_last_state=True, impl="pallas",
                                      block_sizes=bs, **a)
  kw = _kwargs(arrs, True, True, True, True)
  _check_against_reference(run, arrs, kw, tol_fwd, tol_grad)
