"""Tests for pallas_kernels.linear_attention.

Three tiers (DESIGN.md): interpret mode vs the reference on CPU (forward and
dq, dk, dv), jax.export lowering to ("cuda",) and ("tpu",) from CPU at DiT-XL
shapes, and a real-GPU test (marked gpu). The reference itself is checked
against two independent float64 oracles: the quadratic masked form and a
token-by-token recurrence.

Tolerances: f32 kernel vs f32 reference: atol = rtol = 2e-5 (relative to the
largest magnitude for gradients). bf16 kernel vs the f32 reference on the same
bf16 inputs: RMSE ratio ||ref - out|| / ||ref|| < 1e-2 (forward) and
< 2e-2 (gradients), as fla and notes/kernels.md §7.1 use.
"""
import functools
import importlib

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import export_for
from pallas_kernels import linear_attention_gpu as lgpu

# The package re-exports the function under the module's name, so fetch the
# module itself (for _Static / _kernel, the per-backend entry) explicitly.
la = importlib.import_module("pallas_kernels.linear_attention")

# Small tiles so tiny test shapes still cover several tiles, several causal
# chunks, several reduction splits and several tiles per program of the
# parallel kernels, each with a ragged last one.
SMALL = lgpu.BlockSizes(block_n=16, chunk=16, target_programs=64,
                        min_split_rows=32, tiles_per_program=2)


def _inputs(shape, dtype=jnp.float32, dv=None, seed=0):
  kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
  vshape = shape[:3] + (dv or shape[3],)
  q = jax.random.normal(kq, shape, jnp.float32).astype(dtype)
  k = jax.random.normal(kk, shape, jnp.float32).astype(dtype)
  v = jax.random.normal(kv, vshape, jnp.float32).astype(dtype)
  g = jax.random.normal(kg, vshape, jnp.float32)
  return q, k, v, g


def _phi64(x, fm):
  x = np.asarray(x, np.float64)
  return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0))) if fm == "elu" \
      else np.maximum(x, 0)


def _quadratic_oracle(q, k, v, fm, causal, eps):
  """float64 tril(phiQ phiK^T) V / rowsum, the O(N^2) definition."""
  qf, kf = _phi64(q, fm), _phi64(k, fm)
  a = np.einsum("bihd,bjhd->bhij", qf, kf)
  if causal:
    a = a * np.tril(np.ones(a.shape[-2:]))
  num = np.einsum("bhij,bjhe->bihe", a, np.asarray(v, np.float64))
  return num / (a.sum(-1).transpose(0, 2, 1)[..., None] + eps)


def _recurrent_oracle(q, k, v, fm, eps):
  """float64 causal recurrence: S_i = S_{i-1} + phi(k_i) v_i^T."""
  qf, kf, v = _phi64(q, fm), _phi64(k, fm), np.asarray(v, np.float64)
  s = np.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:])
  z = np.zeros(q.shape[:1] + q.shape[2:])
  out = np.zeros(v.shape)
  for i in range(q.shape[1]):
    s += np.einsum("bhd,bhe->bhde", kf[:, i], v[:, i])
    z += kf[:, i]
    out[:, i] = (np.einsum("bhd,bhde->bhe", qf[:, i], s)
                 / (np.einsum("bhd,bhd->bh", qf[:, i], z)[..., None] + eps))
  return out


def _scan_oracle(q, k, v, fm, eps):
  """The same recurrence as a float32 lax.scan (an independent jnp path)."""
  hi = jax.lax.Precision.HIGHEST
  phi = lambda x: jax.nn.elu(x) + 1 if fm == "elu" else jax.nn.relu(x)
  xs = [jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (phi(q), phi(k), v)]

  def step(carry, x):
    s, z = carry
    qi, ki, vi = x
    s = s + jnp.einsum("bhd,bhe->bhde", ki, vi, precision=hi)
    z = z + ki
    o = (jnp.einsum("bhd,bhde->bhe", qi, s, precision=hi)
         / (jnp.einsum("bhd,bhd->bh", qi, z, precision=hi)[..., None] + eps))
    return (s, z), o

  b, _, h, d = q.shape
  init = (jnp.zeros((b, h, d, v.shape[-1])), jnp.zeros((b, h, d)))
  return jnp.moveaxis(jax.lax.scan(step, init, xs)[1], 0, 1)


def _rmse_ratio(ref, out):
  ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
  return np.linalg.norm(ref - out) / np.linalg.norm(ref)


class LinearAttentionReferenceTest(parameterized.TestCase):

  @parameterized.product(causal=(False, True), fm=("elu", "relu"),
                         n=(1, 77, 300))
  def test_reference_matches_float64_oracles(self, causal, fm, n):
    q, k, v, _ = _inputs((2, n, 3, 8), dv=5)
    ref = la.linear_attention_reference(q, k, v, feature_map=fm,
                                        causal=causal, eps=1e-6)
    chex.assert_shape(ref, (2, n, 3, 5))
    oracle = _quadratic_oracle(q, k, v, fm, causal, 1e-6)
    np.testing.assert_allclose(ref, oracle, rtol=2e-5, atol=2e-5)
    if causal:
      np.testing.assert_allclose(
          _recurrent_oracle(q, k, v, fm, 1e-6), oracle, rtol=1e-10)
      np.testing.assert_allclose(_scan_oracle(q, k, v, fm, 1e-6), oracle,
                                 rtol=2e-5, atol=2e-5)

  def test_auto_on_cpu_is_the_reference(self):
    q, k, v, _ = _inputs((1, 33, 2, 16), jnp.bfloat16)
    for causal in (False, True):
      auto = la.linear_attention(q, k, v, causal=causal)
      ref = la.linear_attention(q, k, v, causal=causal, impl="reference")
      chex.assert_type(auto, jnp.bfloat16)
      np.testing.assert_array_equal(auto, ref)


class _KernelTest(parameterized.TestCase):
  """Checks shared by the Triton and Mosaic kernels, both in interpret mode."""
  __test__ = False  # only the subclasses below run
  BACKEND = ""

  def _run(self, q, k, v, g, *, fm, causal, eps=1e-6, bs=SMALL):
    """Returns (out, (dq, dk, dv)) of the kernel under test, jitted."""
    cfg = la._Static(fm, causal, eps, self.BACKEND, bs)
    f = functools.partial(la._kernel, cfg)
    if self.BACKEND == "interpret":  # also exercise the public entry point
      f = functools.partial(la.linear_attention, feature_map=fm, eps=eps,
                            causal=causal, impl="pallas", block_sizes=bs)
    return _value_and_vjp(f, q, k, v, g)

  def _check_against_reference(self, causal, fm, shape, dtype):
    dtype = jnp.dtype(dtype)
    q, k, v, g = _inputs(shape, dtype)
    out, grads = self._run(q, k, v, g, fm=fm, causal=causal)
    ref = functools.partial(la.linear_attention_reference, feature_map=fm,
                            causal=causal)
    ref_out, ref_grads = _value_and_vjp(ref, q, k, v, g)
    chex.assert_type([out, *grads], dtype)
    chex.assert_shape([out, *grads], shape)
    if dtype == jnp.float32:
      np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
      for name, a, b in zip("qkv", grads, ref_grads):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * scale,
                                   err_msg=f"d{name}")
    else:
      ref_out, ref_grads = _value_and_vjp(
          ref, *(x.astype(jnp.float32) for x in (q, k, v)), g)
      self.assertLess(_rmse_ratio(ref_out, out), 1e-2)
      for name, a, b in zip("qkv", grads, ref_grads):
        self.assertLess(_rmse_ratio(b, a), 2e-2, msg=f"d{name}")

  def test_zero_denominator_rows_output_zero(self):
    # relu with all-negative queries: phi(q) = 0, so den = eps = 0 and num = 0.
    q, k, v, g = _inputs((1, 20, 1, 16))
    q = -jnp.abs(q)
    out, grads = self._run(q, k, v, g, fm="relu", causal=False, eps=0.0)
    np.testing.assert_array_equal(out, 0.0)
    for x in grads:
      self.assertTrue(bool(jnp.isfinite(x).all()))

  @parameterized.parameters(False, True)
  def test_value_head_dim_may_differ_and_eps_zero(self, causal):
    q, k, v, g = _inputs((1, 40, 2, 16), dv=40)
    out, grads = self._run(q, k, v, g, fm="elu", causal=causal, eps=0.0)
    ref = functools.partial(la.linear_attention_reference, feature_map="elu",
                            causal=causal, eps=0.0)
    ref_out, ref_grads = _value_and_vjp(ref, q, k, v, g)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    for a, b in zip(grads, ref_grads):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)

  @parameterized.parameters(False, True)
  def test_every_output_element_is_written(self, causal):
    # Interpret mode fills pallas_call outputs (and out-of-bounds input
    # padding) with NaN, so any element a kernel fails to write, or any
    # unmasked read of padding, poisons the results. Default block sizes
    # here: one ragged tile, padded head dims.
    q, k, v, g = _inputs((2, 45, 2, 72), dv=24)
    out, grads = self._run(q, k, v, g, fm="elu", causal=causal,
                           bs=lgpu.BlockSizes())
    for x in (out, *grads):
      self.assertTrue(bool(jnp.isfinite(x).all()))


def _value_and_vjp(f, q, k, v, g):
  @jax.jit
  def run(q, k, v, g):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(g.astype(out.dtype))
  return run(q, k, v, g)


class LinearAttentionInterpretTest(_KernelTest):
  """The Triton kernels in interpret mode (impl="pallas" on CPU)."""
  __test__ = True
  BACKEND = "interpret"

  @parameterized.product(causal=(False, True), fm=("elu", "relu"),
                         shape=((2, 77, 3, 24), (1, 50, 2, 72)),
                         dtype=("float32", "bfloat16"))
  def test_forward_and_gradients_match_reference(self, causal, fm, shape,
                                                 dtype):
    self._check_against_reference(causal, fm, shape, dtype)


class LinearAttentionTpuInterpretTest(_KernelTest):
  """The Mosaic kernels, run by the generic interpreter.

  Their (128-row, 128-lane) tiles interpret slowly, so this covers a subset:
  each feature map, causal or not, and dtype once, at the ragged head_dim-72
  shape (two row tiles, one padded).
  """
  __test__ = True
  BACKEND = "tpu_interpret"

  @parameterized.parameters(
      (False, "elu", "float32"), (True, "relu", "float32"),
      (False, "relu", "bfloat16"), (True, "elu", "bfloat16"))
  def test_forward_and_gradients_match_reference(self, causal, fm, dtype):
    self._check_against_reference(causal, fm, (1, 130, 2, 72), dtype)


def test_poison_is_visible():
  """The canary for the test above: an unwritten element reads as NaN."""
  from jax.experimental import pallas as pl

  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) == 0)
    def _():
      o_ref[...] = x_ref[...]

  spec = pl.BlockSpec((8,), lambda i: (i,))
  out = pl.pallas_call(kernel, grid=(2,), in_specs=[spec], out_specs=spec,
                       out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                       interpret=True)(jnp.ones(16))
  assert bool(jnp.isfinite(out[:8]).all()) and bool(jnp.isnan(out[8:]).all())


def _export(f, platform, *shapes):
  return export_for(jax.jit(f), platform, *shapes).mlir_module()


class LinearAttentionLoweringTest(parameterized.TestCase):
  """jax.export from CPU runs the real Triton / Mosaic lowering (impl="auto").

  Catches what interpret mode accepts but the hardware compilers reject:
  non-power-of-two Triton values, value slicing, (8, 128) TPU blocks.
  """

  @parameterized.product(platform=("cuda", "tpu"), causal=(False, True),
                         n=(1024, 4096), mode=("fwd", "bwd"))
  def test_lowers_at_dit_xl_shapes(self, platform, causal, n, mode):
    # DiT-XL: 1152 = 16 heads x 72; 1024 tokens is 256px/2, 4096 512px/2.
    x = jax.ShapeDtypeStruct((2, n, 16, 72), jnp.bfloat16)
    f = functools.partial(la.linear_attention, causal=causal)
    if mode == "bwd":
      f = jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(),
                   argnums=(0, 1, 2))
    text = _export(f, platform, x, x, x)
    if platform == "cuda":
      marker = "__gpu$xla.gpu.triton"
      # fwd: reduce + out (non-causal) or one kernel (causal); the grad needs
      # the forward's residual kernel plus the backward kernels.
      want = {(False, "fwd"): 2, (False, "bwd"): 3, (True, "fwd"): 1,
              (True, "bwd"): 2}[causal, mode]
    else:
      marker = "tpu_custom_call"
      want = {(False, "fwd"): 2, (False, "bwd"): 3, (True, "fwd"): 1,
              (True, "bwd"): 3}[causal, mode]
    self.assertEqual(text.count(f"custom_call @{marker}"), want)

  @parameterized.parameters("cuda", "tpu")
  def test_lowers_f32_power_of_two_head_dim(self, platform):
    x = jax.ShapeDtypeStruct((1, 16384, 4, 64), jnp.float32)
    f = jax.grad(lambda q, k, v: la.linear_attention(
        q, k, v, feature_map="relu").sum(), argnums=(0, 1, 2))
    self.assertIn("custom_call", _export(f, platform, x, x, x))


class LinearAttentionValidationTest(parameterized.TestCase):

  def test_bad_inputs_raise_value_error_naming_the_argument(self):
    x = jnp.zeros((1, 8, 2, 16))
    cases = [
        (dict(q=x[0]), "q must have rank 4"),
        (dict(k=jnp.zeros((1, 9, 2, 16))), "k.shape must equal"),
        (dict(v=jnp.zeros((1, 8, 3, 16))), "v.shape"),
        (dict(v=x.astype(jnp.bfloat16)), "one dtype"),
        (dict(q=x.astype(jnp.int32)), "q must have a floating dtype"),
        (dict(feature_map="softmax"), "feature_map must be"),
        (dict(eps=-1.0), "eps must be >= 0"),
        (dict(causal="yes"), "causal must be"),
        (dict(impl="triton"), "impl must be one of"),
        (dict(block_sizes=lgpu.BlockSizes(block_n=48)), "block_n must be"),
    ]
    for kwargs, msg in cases:
      args = dict(q=x, k=x, v=x)
      args.update(kwargs)
      with self.assertRaisesRegex(ValueError, msg):
        la.linear_attention(**args)


@pytest.mark.gpu
class LinearAttentionGpuTest(parameterized.TestCase):
  """Compiled Triton kernels on a real GPU (pytest -m gpu)."""

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "gpu":
      self.skipTest("needs a GPU")

  @parameterized.product(causal=(False, True), n=(1000, 4096))
  def test_matches_reference_bf16(self, causal, n):
    q, k, v, g = _inputs((2, n, 16, 72), jnp.bfloat16)
    f = functools.partial(la.linear_attention, causal=causal, impl="pallas")
    ref = functools.partial(la.linear_attention_reference, causal=causal)
    out, grads = _value_and_vjp(f, q, k, v, g)
    ref_out, ref_grads = _value_and_vjp(
        ref, *(x.astype(jnp.float32) for x in (q, k, v)), g)
    self.assertLess(_rmse_ratio(ref_out, out), 1e-2)
    for a, b in zip(grads, ref_grads):
      self.assertLess(_rmse_ratio(b, a), 2e-2)
