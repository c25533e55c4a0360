"""The accelerator branches of `impl="auto"` are traced once per config."""
import collections
import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels import _backend

# The module (the package exports its function under the same name).
ss = importlib.import_module("pallas_kernels.selective_scan")


def _kernel(x, *, scale):
  return x * scale


def test_equal_kernels_share_one_jit():
  a = _backend._shared_jit(functools.partial(_kernel, scale=2.0))
  b = _backend._shared_jit(functools.partial(_kernel, scale=2.0))
  c = _backend._shared_jit(functools.partial(_kernel, scale=3.0))
  assert a is b and a is not c
  assert float(c(jnp.float32(1.0))) == 3.0
  # An unhashable argument: no sharing, the callable itself is used.
  unhashable = functools.partial(_kernel, scale=[2.0])
  assert _backend._shared_jit(unhashable) is unhashable


def test_identical_calls_trace_each_backend_kernel_once(monkeypatch):
  traced = collections.Counter()
  real = ss._pallas

  def counting(backend, interpret, *args, **kwargs):
    traced[backend, interpret] += 1
    return real(backend, interpret, *args, **kwargs)

  monkeypatch.setattr(ss, "_pallas", counting)
  b, l, d, n = 1, 8, 4, 2
  u = jnp.ones((b, l, d))
  a = -jnp.ones((d, n))
  bc = jnp.ones((b, l, 1, n))

  def two_blocks(u):
    y = ss.selective_scan(u, u, a, bc, bc)
    return jnp.sum(ss.selective_scan(y, u, a, bc, bc))

  jax.make_jaxpr(jax.grad(two_blocks))(u)
  # Both accelerators' kernels are staged out (platform_dependent), each
  # once although the scan runs twice; the CPU path is the reference.
  assert traced == {("gpu", False): 1, ("tpu", False): 1}
