"""Feed-forward layers of a DiT-family block, chosen by name.

A block builds `get_feedforward(name)(hidden=..., dtype=..., param_dtype=...,
**mlp_options)` and calls it as `ff(x, c, deterministic)`, where `c` is the
(B, D) conditioning vector (timestep + label) for routers that use it, and
`hidden` is the dense MLP's width, int(D * mlp_ratio). Registered here:
"dense" (DiT's MLP) and "swiglu" (LightningDiT's); the MoE layer
(jdit/models/moe.py) registers itself as "moe".
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jdit.models.embed import dense
from jdit.models.mixers import Projection

FEEDFORWARDS: dict[str, type[nn.Module]] = {}


def register_feedforward(name: str):
  def add(cls):
    if name in FEEDFORWARDS:
      raise ValueError(f"feed-forward {name!r} is already registered")
    FEEDFORWARDS[name] = cls
    return cls
  return add


def get_feedforward(name: str) -> type[nn.Module]:
  if name not in FEEDFORWARDS:
    raise ValueError(f"unknown mlp {name!r}; registered: "
                     f"{sorted(FEEDFORWARDS)}")
  return FEEDFORWARDS[name]


@register_feedforward("dense")
class Mlp(nn.Module):
  """Transformer MLP: Dense -> GELU(tanh) -> Dense, as in DiT (timm Mlp)."""
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def macs(self, dim: int) -> int:
    """Multiply-adds per token."""
    return 2 * dim * self.hidden

  @nn.compact
  def __call__(self, x, c=None, deterministic=True):
    del c, deterministic
    d = x.shape[-1]
    x = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype,
              param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=True)
    return dense(d, ("mlp", "embed"), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc2")(x)


@register_feedforward("swiglu")
class SwiGLU(nn.Module):
  """w3(silu(x W1) * x W2), the gated MLP of LLaMA and LightningDiT.

  The gated width is int(2/3 * hidden), so that three matrices hold as many
  parameters as the dense MLP's two (LightningDiT's choice: 3072 for
  DiT-XL's 4608). W1 and W2 are one (D, 2, width) kernel, `w12`, computed
  in one matmul; its (2,) axis is separate from the `mlp` axis so tensor
  parallelism splits both halves alike.
  """
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def width(self) -> int:
    return int(2 / 3 * self.hidden)  # LightningDiT's rounding, exactly

  def macs(self, dim: int) -> int:
    """Multiply-adds per token."""
    return 3 * dim * self.width

  @nn.compact
  def __call__(self, x, c=None, deterministic=True):
    del c, deterministic
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Projection((d,), (2, self.width), ("embed", None, "mlp"), name="w12",
                   **kw)(x)
    h = nn.silu(h[..., 0, :]) * h[..., 1, :]
    return dense(d, ("mlp", "embed"), name="w3", **kw)(h)
