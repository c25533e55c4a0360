"""Layers of the LaMamba-Diff U-Net: norms, patch merging/expanding, output.

Fu, Chen & Yu, arXiv 2408.02615; shapes and order as in the official
yunxiangfu2001/LaMamba-Diff (VMamba's PatchMerging2D / PatchExpanding2D),
written for channels-last token sequences (B, L, D) in row-major grid order.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jdit.models.dit import adaln_modulation, modulate
from jdit.models.embed import dense


def norm(name, affine=False, param_dtype=jnp.float32):
  """LayerNorm in float32; affine only where the paper's has no adaLN."""
  if not affine:
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False,
                        dtype=jnp.float32, name=name)
  return nn.LayerNorm(
      epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                              ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             ("embed",)),
      name=name)


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated -> LayerNorm -> Linear (Swin/VMamba)."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid):
    b, d = x.shape[0], x.shape[-1]
    h, w = grid
    x = x.reshape(b, h // 2, 2, w // 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
    x = norm("norm", True, self.param_dtype)(x.reshape(b, -1, 4 * d))
    return dense(self.features, ("embed", "mlp"), use_bias=False,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 name="reduction")(x.astype(self.dtype))


class PatchExpanding(nn.Module):
  """Linear to factor^2 * features -> pixel shuffle -> LayerNorm."""
  features: int
  factor: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, grid):
    b, (h, w), f = x.shape[0], grid, self.factor
    x = dense(f * f * self.features, ("embed", "mlp"), use_bias=False,
              dtype=self.dtype, param_dtype=self.param_dtype,
              name="expand")(x)
    x = x.reshape(b, h, w, f, f, self.features).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h * f * w * f, self.features)
    return norm("norm", True, self.param_dtype)(x).astype(self.dtype)


class FinalLayer(nn.Module):
  """Expand tokens to pixels, adaLN, zero-initialised linear to C_out."""
  patch_size: int
  out_channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, grid):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    c = dense(d, ("embed", "mlp"), name="condition_projection", **kw)(c)
    x = PatchExpanding(d, self.patch_size, name="final_expand", **kw)(x, grid)
    shift, scale = adaln_modulation(c, 2, **kw)
    x = modulate(norm("norm_final")(x), shift, scale)
    return dense(self.out_channels, ("embed", None),
                 kernel_init=nn.initializers.zeros_init(), name="linear",
                 **kw)(x.astype(self.dtype))
