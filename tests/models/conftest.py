"""Fixtures for the model tests.

Until pallas_kernels.local_attention lands in a checkout, the "local" mixer
is tested against a dense masked stand-in with the kernel's semantics (the
library itself never uses a stand-in: it raises NotImplementedError).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pallas_kernels
import pytest


def local_attention_standin(q, k, v, *, grid_shape, window, shape="circle",
                            impl="auto"):
  """Dense attention masked to the circle/square window of the kernel."""
  del impl
  pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid_shape],
                             indexing="ij"), -1).reshape(-1, len(grid_shape))
  d = pos[:, None] - pos[None]
  if shape == "circle":
    mask = (d ** 2).sum(-1) <= window ** 2
  else:
    mask = np.abs(d).max(-1) <= window
  return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))


@pytest.fixture(autouse=True)
def _local_attention_kernel(monkeypatch):
  if not hasattr(pallas_kernels, "local_attention"):
    monkeypatch.setattr(pallas_kernels, "local_attention",
                        local_attention_standin, raising=False)
