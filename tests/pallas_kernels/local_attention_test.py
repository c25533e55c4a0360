"""Tests for pallas_kernels.local_attention.

Tiers (DESIGN.md): the mask semantics against hand-built numpy masks; the
block tables against a brute-force pair enumeration; interpret mode vs the
reference on CPU (forward and dq, dk, dv) for both kernel families (Triton-
style loops and the Mosaic-style grid), with every output element proven
written; jax.export lowering to ("cuda",) and ("tpu",) at DiT-XL shapes,
forward and backward; a real-GPU test (marked gpu).

Tolerances: f32 kernel (interpret) vs the f32 reference at HIGHEST precision:
atol = rtol = 2e-5 (observed ~1e-6). bf16 kernel vs the f32 reference on the
same bf16 inputs: RMSE ratio ||ref - out|| / ||ref|| < 1e-2 and max-abs error
< 2e-2 (forward), RMSE ratio < 2e-2 (gradients), as notes/kernels.md §7.1.
"""
import dataclasses
import functools
import importlib
import itertools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import export_for
from pallas_kernels import local_attention as local_attention_fn
from pallas_kernels import local_attention_kernels as lak
from pallas_kernels import local_attention_tpu as lat
from pallas_kernels.local_attention_geometry import Geometry, block_table

# The package re-exports the function under the module's name.
la = importlib.import_module("pallas_kernels.local_attention")

# Small tiles so tiny grids still span several tiles, several key blocks per
# query block, padded tiles and blocks of different sizes fwd/bwd.
SMALL2 = la.BlockSizes(tile=(4, 8), block_q=32, block_k=16, block_q_bwd=16,
                       block_k_bwd=32)
SMALL3 = la.BlockSizes(tile=(2, 2, 8), block_q=32, block_k=16,
                       block_q_bwd=16, block_k_bwd=32)
TPU2 = la.BlockSizes(tile=(8, 16), block_q=128, block_k=128,
                     block_q_bwd=128, block_k_bwd=128)
TPU3 = la.BlockSizes(tile=(2, 4, 16), block_q=128, block_k=128,
                     block_q_bwd=128, block_k_bwd=128)


def _inputs(n, heads, d, dtype=jnp.float32, batch=2, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v = (jax.random.normal(x, (batch, n, heads, d)).astype(dtype)
             for x in ks[:3])
  g = jax.random.normal(ks[3], (batch, n, heads, d))
  return q, k, v, g


def _kernel(q, k, v, grid, window, shape, bs, backend):
  geo = la._geometry(tuple(grid), window, shape, bs.tile)
  return la._pallas(q, k, v, geo=geo, block_sizes=bs, backend=backend,
                    interpret=True)


def _reference(q, k, v, grid, window, shape):
  return la.local_attention_reference(q, k, v, grid_shape=grid,
                                      window=window, shape=shape)


def _grads(fn, q, k, v, g):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g)
  return jax.grad(loss, (0, 1, 2))(q, k, v)


def _fwd_grads(fn, q, k, v, g):
  """Output and (dq, dk, dv) for cotangent g, in one jit (one compile)."""
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(g.astype(out.dtype))
  return jax.jit(run)(q, k, v)


def _rmse_ratio(ref, out):
  ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
  return np.linalg.norm(ref - out) / np.linalg.norm(ref)


def _numpy_mask(grid, window, shape):
  """Hand-built mask: loops over every (query, key) pair of the grid."""
  coords = list(itertools.product(*(range(g) for g in grid)))
  m = np.zeros((len(coords), len(coords)), bool)
  for i, ci in enumerate(coords):
    for j, cj in enumerate(coords):
      d = [a - b for a, b in zip(ci, cj)]
      m[i, j] = (sum(x * x for x in d) <= window * window if shape == "circle"
                 else max(abs(x) for x in d) <= window)
  return m


class MaskSemanticsTest(parameterized.TestCase):
  """With q = k = 0 attention is uniform over visible keys; v = identity."""

  def test_hand_counted_3x3(self):
    # Radius 1 on a 3x3 grid: circle = plus shape, square = full 3x3 box.
    circle = _numpy_mask((3, 3), 1, "circle")
    square = _numpy_mask((3, 3), 1, "square")
    np.testing.assert_array_equal(circle.sum(1), [3, 4, 3, 4, 5, 4, 3, 4, 3])
    np.testing.assert_array_equal(square.sum(1), [4, 6, 4, 6, 9, 6, 4, 6, 4])

  @parameterized.product(
      case=[((3, 5), 1), ((4, 6), 2), ((5, 3), 0), ((2, 3, 4), 1),
            ((3, 4), 9)],
      shape=["circle", "square"], impl=["reference", "pallas"])
  def test_mask_matches_numpy(self, case, shape, impl):
    grid, window = case
    n = int(np.prod(grid))
    d = 16 * -(-n // 16)
    z = jnp.zeros((1, n, 1, d), jnp.float32)
    eye = jnp.eye(n, d, dtype=jnp.float32)[None, :, None, :]
    bs = SMALL2 if len(grid) == 2 else SMALL3
    out = local_attention_fn(z, z, eye, grid_shape=grid, window=window,
                             shape=shape, impl=impl, block_sizes=bs)
    want = _numpy_mask(grid, window, shape)
    got = np.asarray(out[0, :, 0, :n])
    np.testing.assert_array_equal(got > 0, want)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)


class BlockTableTest(parameterized.TestCase):

  @parameterized.parameters(
      ((10, 13), (4, 8), 2, "circle", 16, 32),
      ((19, 21), (8, 16), 5, "square", 128, 64),
      ((3, 5, 6), (2, 2, 8), 1, "circle", 32, 16))
  def test_table_covers_every_visible_pair(self, grid, tile, r, shape, bq,
                                           bk):
    geo = Geometry(grid, tile, r, shape)
    coords = geo.block_base(1)  # tile order
    valid = np.all(coords < np.asarray(grid), -1)
    off = coords[:, None] - coords[None]
    vis = ((off ** 2).sum(-1) <= r * r if shape == "circle"
           else np.abs(off).max(-1) <= r) & valid[:, None] & valid[None]
    blocks = vis.reshape(len(vis) // bq, bq, len(vis) // bk, bk)
    need = blocks.any((1, 3))
    full = (blocks | ~valid[:, None][None].reshape(
        len(vis) // bq, bq, 1, 1)).all((1, 3))
    for transpose in (False, True):
      t = block_table(geo, bq, bk, transpose)
      want = need.T if transpose else need
      got = np.zeros_like(want)
      for row in range(want.shape[0]):
        cols = t.index[row, :t.num_total[row]]
        got[row, cols] = True
        # Blocks skipping the mask must really be fully visible.
        unmasked = t.index[row, t.num_masked[row]:t.num_total[row]]
        ok = full.T[row] if transpose else full[row]
        self.assertTrue(np.all(ok[unmasked]))
      np.testing.assert_array_equal(got, want)

  def test_sparsity_at_64x64(self):
    geo = Geometry((64, 64), (8, 16), 4, "circle")
    t = block_table(geo, 128, 64)
    # An 8x16 query block's radius-4 window spans 16x24 tokens: at most
    # 5 x 3 (4x16) key blocks of the 64 in the grid, interior included.
    self.assertLessEqual(t.visited / t.pairs, 15 / 64)
    self.assertEqual(t.num_total.max(), t.width)


class InterpretTest(parameterized.TestCase):
  """Kernel (interpret mode) vs reference, forward and gradients."""

  def _check_f32(self, grid, window, shape, bs, backend, heads=2, d=24):
    n = int(np.prod(grid))
    q, k, v, g = _inputs(n, heads, d)
    kern = functools.partial(_kernel, grid=grid, window=window, shape=shape,
                             bs=bs, backend=backend)
    ref = functools.partial(_reference, grid=grid, window=window,
                            shape=shape)
    out, grads = _fwd_grads(kern, q, k, v, g)
    want, want_grads = _fwd_grads(ref, q, k, v, g)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, q.dtype)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    for a, b in zip(grads, want_grads):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)

  @parameterized.parameters((0, "circle"), (2, "circle"), (5, "circle"),
                            (40, "circle"), (2, "square"), (40, "square"))
  def test_gpu_kernel_2d_ragged(self, window, shape):
    # 10x13: not divisible by the 4x8 tile in either axis; 40 > grid.
    self._check_f32((10, 13), window, shape, SMALL2, "gpu")

  @parameterized.parameters((1, "circle"), (2, "square"), (0, "square"))
  def test_gpu_kernel_3d(self, window, shape):
    self._check_f32((3, 5, 6), window, shape, SMALL3, "gpu")

  def test_gpu_kernel_non_square(self):
    self._check_f32((4, 24), 3, "circle", SMALL2, "gpu")

  @parameterized.parameters(((10, 13), 3, "circle", TPU2),
                            ((10, 13), 40, "square", TPU2),
                            ((3, 6, 10), 1, "circle", TPU3))
  def test_tpu_kernel(self, grid, window, shape, bs):
    self._check_f32(grid, window, shape, bs, "tpu")

  @parameterized.parameters("gpu", "tpu")
  def test_bf16_head_dim_72(self, backend):
    grid, window, shape = (12, 12), 3, "circle"
    bs = SMALL2 if backend == "gpu" else TPU2
    q, k, v, g = _inputs(144, 2, 72, jnp.bfloat16)
    kern = functools.partial(_kernel, grid=grid, window=window, shape=shape,
                             bs=bs, backend=backend)
    ref = functools.partial(_reference, grid=grid, window=window,
                            shape=shape)
    out, grads = _fwd_grads(kern, q, k, v, g)
    want, want_grads = _fwd_grads(ref, q, k, v, g)
    chex.assert_type(out, jnp.bfloat16)
    self.assertLess(_rmse_ratio(want, out), 1e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(want, np.float32), atol=2e-2)
    for a, b in zip(grads, want_grads):
      chex.assert_type(a, jnp.bfloat16)
      self.assertLess(_rmse_ratio(b, a), 2e-2)

  def test_public_pallas_default_blocks(self):
    # Default tiles (8x16) and blocks through the public entry point.
    q, k, v, g = _inputs(16 * 20, 2, 64, seed=1)
    kw = dict(grid_shape=(16, 20), window=4, shape="circle")
    out = local_attention_fn(q, k, v, impl="pallas", **kw)
    np.testing.assert_allclose(out, local_attention_fn(
        q, k, v, impl="reference", **kw), atol=2e-5, rtol=2e-5)
    auto = local_attention_fn(q, k, v, impl="auto", **kw)  # CPU: reference
    np.testing.assert_allclose(auto, local_attention_fn(
        q, k, v, impl="reference", **kw), atol=1e-6)

  def test_chunked_reference_matches_dense(self):
    q, k, v, _ = _inputs(7 * 9, 1, 8)
    kw = dict(grid_shape=(7, 9), window=2, shape="circle")
    dense = la.local_attention_reference(q, k, v, **kw)
    chunked = la.local_attention_reference(q, k, v, query_chunk=16, **kw)
    np.testing.assert_allclose(chunked, dense, atol=1e-6)


class PoisonTest(parameterized.TestCase):
  """Outputs start as NaN (aliased inputs): every element must be written,
  including grid padding rows and feature padding columns."""

  @parameterized.parameters(("gpu", SMALL2), ("tpu", TPU2))
  def test_every_output_written(self, backend, bs):
    grid = (10, 13)  # ragged: whole padded tiles, and window 0 leaves
    geo = la._geometry(grid, 0, "circle", bs.tile)  # padded rows unvisited
    q, k, v, _ = _inputs(130, 1, 24, batch=1)
    cfg = la._kernel_config(q, geo, bs, backend, True)
    cfg = dataclasses.replace(cfg, poison=True)
    qt, kt, vt = (geo.to_tiles(x, cfg.head_dim) for x in (q, k, v))
    fwd = lak.gpu_forward if backend == "gpu" else lat.tpu_forward
    o, lse = fwd(qt, kt, vt, cfg)
    _, lse_fixed = la._forward(qt, kt, vt, cfg)
    grads = la._attend_bwd(cfg, (qt, kt, vt, o, lse_fixed),
                           jnp.ones_like(o))
    outs = (o, lse) + tuple(grads)
    for x in outs:
      self.assertTrue(bool(jnp.all(jnp.isfinite(x))), x.shape)
    # The unpoisoned result agrees on real tokens.
    np.testing.assert_allclose(geo.from_tiles(o, 24), _reference(
        q, k, v, grid, 0, "circle"), atol=2e-5)


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("n_mismatch", dict(grid_shape=(4, 5)), "grid_shape"),
      ("grid_rank", dict(grid_shape=(16,)), "grid_shape"),
      ("grid_rank4", dict(grid_shape=(1, 1, 4, 4)), "grid_shape"),
      ("neg_window", dict(window=-1), "window"),
      ("float_window", dict(window=2.0), "window"),
      ("bool_window", dict(window=True), "window"),
      ("bad_shape", dict(shape="diamond"), "shape"),
      ("bad_impl", dict(impl="cuda"), "impl"))
  def test_bad_args(self, override, match):
    q = jnp.zeros((1, 16, 2, 8))
    kw = dict(grid_shape=(4, 4), window=1, shape="circle", impl="reference")
    kw.update(override)
    with self.assertRaisesRegex(ValueError, match):
      local_attention_fn(q, q, q, **kw)

  @parameterized.parameters(
      (la.BlockSizes(tile=(4, 6)), "tile"),
      (la.BlockSizes(tile=(4, 4, 4)), "tile"),
      (la.BlockSizes(tile=(2, 4)), "block sizes"),
      (la.BlockSizes(block_k=48), "block sizes"))
  def test_bad_block_sizes(self, bs, match):
    q = jnp.zeros((1, 16, 2, 8))
    with self.assertRaisesRegex(ValueError, match):
      local_attention_fn(q, q, q, grid_shape=(4, 4), window=1, impl="pallas",
                         block_sizes=bs)

  def test_mismatched_inputs(self):
    q = jnp.zeros((1, 16, 2, 8))
    kw = dict(grid_shape=(4, 4), window=1)
    with self.assertRaisesRegex(ValueError, "same shape"):
      local_attention_fn(q, q[:, :, :1], q, **kw)
    with self.assertRaisesRegex(ValueError, "same dtype"):
      local_attention_fn(q, q.astype(jnp.bfloat16), q, **kw)
    with self.assertRaisesRegex(ValueError, "q must have shape"):
      local_attention_fn(q[0], q, q, **kw)


class LoweringTest(parameterized.TestCase):
  """jax.export from CPU runs the Triton / Mosaic lowering of the kernels."""

  @parameterized.product(
      case=[((32, 32), 72, 4, "circle"), ((64, 64), 72, 8, "circle"),
            ((64, 64), 128, 3, "square"), ((4, 16, 16), 64, 2, "circle"),
            ((40, 56), 72, 5, "circle")],  # padded, non-power-of-two N
      platform=["cuda", "tpu"])
  def test_export(self, case, platform):
    grid, d, window, shape = case
    n = int(np.prod(grid))
    spec = jax.ShapeDtypeStruct((2, n, 16, d), jnp.bfloat16)
    fwd = functools.partial(local_attention_fn, grid_shape=grid,
                            window=window, shape=shape)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) ** 2)
    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    for fn, calls in ((fwd, 1), (jax.grad(loss, (0, 1, 2)), 3)):
      text = export_for(jax.jit(fn), platform, spec, spec, spec).mlir_module()
      self.assertEqual(text.count(marker), calls)


@pytest.mark.gpu
class GpuTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "gpu":
      self.skipTest("needs a GPU")

  @parameterized.parameters((64, 64, 4, "circle"), (40, 56, 7, "square"))
  def test_matches_reference(self, h, w, window, shape):
    q, k, v, g = _inputs(h * w, 4, 72, jnp.bfloat16)
    kw = dict(grid_shape=(h, w), window=window, shape=shape)
    kern = jax.jit(functools.partial(local_attention_fn, impl="pallas", **kw))
    ref = functools.partial(local_attention_fn, impl="reference", **kw)
    self.assertLess(_rmse_ratio(ref(q, k, v), kern(q, k, v)), 1e-2)
    for a, b in zip(_grads(kern, q, k, v, g), _grads(ref, q, k, v, g)):
      self.assertLess(_rmse_ratio(b, a), 2e-2)
