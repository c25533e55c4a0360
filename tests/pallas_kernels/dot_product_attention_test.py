"""Dense attention: splash on TPU (interpret mode and lowering), cuDNN/XLA.

The oracle is a softmax attention written here in float64 numpy.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dot_product_attention, export_for

MARKER = "tpu_custom_call"


def _oracle(q, k, v):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhnm,bmhd->bnhd", p, v)


def _qkv(n, m, heads, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, (2, length, heads, d), jnp.float32).astype(
      dtype) for key, length in zip(keys, (n, m, m))]


# (N, M, head_dim, dtype, tolerance): M != N is kv_compress / the proxies'.
CASES = [(256, 256, 72, jnp.float32, 2e-5), (128, 384, 64, jnp.float32, 2e-5),
         (256, 128, 72, jnp.bfloat16, 3e-2)]


@pytest.mark.parametrize("n,m,d,dtype,tol", CASES)
def test_splash_interpret_matches_oracle(n, m, d, dtype, tol):
  q, k, v = _qkv(n, m, 2, d, dtype)
  out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v,
                                                      impl="pallas"))(q, k, v)
  assert out.shape == (2, n, 2, d) and out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float64), _oracle(q, k, v),
                             atol=tol, rtol=tol)


def test_splash_interpret_gradients_match_reference():
  q, k, v = _qkv(128, 256, 2, 72, jnp.float32, seed=1)
  w = jax.random.normal(jax.random.key(2), (2, 128, 2, 72))
  grads = {impl: jax.jit(jax.grad(
      lambda q, k, v, impl=impl: jnp.sum(w * dot_product_attention(
          q, k, v, impl=impl)), argnums=(0, 1, 2)))(q, k, v)
           for impl in ("pallas", "reference")}
  for got, want in zip(grads["pallas"], grads["reference"]):
    assert float(jnp.abs(want).max()) > 1e-2
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_auto_on_cpu_is_xla():
  q, k, v = _qkv(64, 32, 2, 16, jnp.float32)  # not a splash length: any path
  np.testing.assert_allclose(dot_product_attention(q, k, v), _oracle(q, k, v),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [256, 1024, 4096])  # DiT-XL/2 at 256-1024px
def test_tpu_lowering_is_splash(n):
  x = jax.ShapeDtypeStruct((2, n, 16, 72), jnp.bfloat16)
  fwd = jax.jit(dot_product_attention)
  loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v).astype(
      jnp.float32) ** 2)
  assert export_for(fwd, "tpu", x, x, x).mlir_module().count(MARKER) == 1
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  # forward, dq and dk/dv kernels
  assert export_for(grad, "tpu", x, x, x).mlir_module().count(MARKER) == 3


def test_lengths_splash_cannot_block_lower_through_xla():
  x = jax.ShapeDtypeStruct((2, 64, 16, 72), jnp.bfloat16)   # 8x8 windows
  text = export_for(jax.jit(dot_product_attention), "tpu", x, x, x)
  assert MARKER not in text.mlir_module()


def test_cuda_export_lowers():
  # Exporting from a CPU host cannot query cuDNN, so this is the XLA path;
  # what matters is that the cuDNN branch traces without failing.
  x = jax.ShapeDtypeStruct((2, 256, 16, 72), jnp.bfloat16)
  assert export_for(jax.jit(dot_product_attention), "cuda", x, x, x)


@pytest.mark.parametrize("args,match", [
    (dict(q=jnp.zeros((2, 8, 4))), "q must have rank 4"),
    (dict(k=jnp.zeros((2, 8, 3, 16))), r"k must have shape \(2, M, 4, 16\)"),
    (dict(v=jnp.zeros((2, 7, 4, 16))), "v must have shape"),
    (dict(v=jnp.zeros((2, 8, 4, 16), jnp.bfloat16)), "share one dtype"),
    (dict(q=jnp.zeros((2, 8, 4, 16), jnp.int32)), "floating dtype"),
    (dict(impl="triton"), "impl must be one of"),
])
def test_bad_input(args, match):
  kw = dict(q=jnp.zeros((2, 8, 4, 16)), k=jnp.zeros((2, 8, 4, 16)),
            v=jnp.zeros((2, 8, 4, 16)))
  kw.update(args)
  with pytest.raises(ValueError, match=match):
    dot_product_attention(**kw)
