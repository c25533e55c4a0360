"""Token mixers: the one place where a DiT-family block's attention is chosen.

Every mixer is a Flax module registered with `@register_mixer("name")` and has
the same constructor and call signature, so a backbone picks one by config
name and the registry-wide tests cover it automatically:

  Mixer(num_heads=..., dtype=..., param_dtype=..., **mixer_options)
  mixer(x, *, grid_shape, deterministic) -> same shape as x

`x` is (B, L, D) with L = prod(grid_shape) tokens in row-major order over the
2D (H, W) or 3D (T, H, W) token grid. Options a mixer does not declare as a
field are rejected with the list of the ones it does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.models import embed, kernel_sharding

MIXERS: dict[str, type[nn.Module]] = {}

# Fields every mixer has; set by the block, not by the user's mixer options.
_COMMON_FIELDS = ("num_heads", "dtype", "param_dtype", "parent", "name")


def register_mixer(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator adding a token mixer to the registry under `name`."""

  def add(cls):
    if name in MIXERS:
      raise ValueError(f"mixer {name!r} is already registered")
    MIXERS[name] = cls
    cls.mixer_name = name
    return cls

  return add


def mixer_options(name: str) -> tuple[str, ...]:
  """The options (dataclass fields) that mixer `name` accepts."""
  cls = get_mixer(name)
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.name not in _COMMON_FIELDS and f.init)


def get_mixer(name: str) -> type[nn.Module]:
  if name not in MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: "
                     f"{sorted(MIXERS)}")
  return MIXERS[name]


def check_mixer_options(name: str, options: dict) -> None:
  """Raises ValueError for options that do not belong to mixer `name`."""
  allowed = mixer_options(name)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"mixer_options {unknown} do not belong to mixer "
                     f"{name!r}; it accepts {list(allowed)}")


class Projection(nn.Module):
  """y = einsum(x, kernel) + bias with a multi-axis kernel.

  Kernel shape `in_shape + out_shape`, each axis with a logical name, so that
  tensor parallelism can shard heads. (nn.DenseGeneral builds its kernel flat
  and reshapes it, which drops per-axis sharding names.) `fan_in`/`fan_out`
  give the xavier-uniform fans of the equivalent 2D matrix, matching DiT's
  initialisation of the fused Linear; `kernel_init` replaces it (e.g. zeros
  for a branch that must start switched off).
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_axes: tuple
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Callable | None = None

  @nn.compact
  def __call__(self, x):
    fan_in = math.prod(self.in_shape)
    fan_out = math.prod(self.out_shape)
    limit = (6.0 / (fan_in + fan_out)) ** 0.5

    def init(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -limit, limit)

    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init or init,
                                               self.kernel_axes),
        self.in_shape + self.out_shape, self.param_dtype)
    bias = self.param(
        "bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(),
            self.kernel_axes[len(self.in_shape):]),
        self.out_shape, self.param_dtype)
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (contract, ((), ())))
    return y + bias.astype(self.dtype)


def qkv_projection(x, num_heads, *, dtype, param_dtype, name="qkv"):
  """(B, L, D) -> q, k, v each (B, L, heads, head_dim); one fused matmul."""
  d = x.shape[-1]
  if d % num_heads:
    raise ValueError(f"hidden size {d} is not divisible by num_heads="
                     f"{num_heads}")
  qkv = Projection((d,), (3, num_heads, d // num_heads),
                   ("embed", None, "heads", "kv"), dtype=dtype,
                   param_dtype=param_dtype, name=name)(x)
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def out_projection(o, *, dtype, param_dtype, name="proj", kernel_init=None):
  """(B, L, heads, head_dim) -> (B, L, D)."""
  heads, head_dim = o.shape[-2:]
  return Projection((heads, head_dim), (heads * head_dim,),
                    ("heads", "kv", "embed"), dtype=dtype,
                    param_dtype=param_dtype, kernel_init=kernel_init,
                    name=name)(o)


def attention(q, k, v, impl="auto"):
  """Dense attention, (B, N, heads, d) x (B, M, heads, d) -> (B, N, heads, d).

  cuDNN flash attention on GPU, splash attention on TPU
  (`pallas_kernels.dot_product_attention`; XLA's default would materialise
  the score matrix), run per shard under a mesh (jdit.models.kernel_sharding).
  """
  return kernel_sharding.kernel("dot_product_attention")(q, k, v, impl=impl)


QK_NORMS = (None, "rms", "layer")


def qk_norm(kind, name):
  """Per-head norm of queries or keys over head_dim, statistics in f32.

  "rms": RMSNorm with a scale (eps 1e-6); "layer": LayerNorm with scale and
  bias (eps 1e-5, torch's default), LightningDiT's two choices.
  """
  init = lambda f: nn.with_logical_partitioning(f, ("kv",))
  if kind == "rms":
    return nn.RMSNorm(epsilon=1e-6, dtype=jnp.float32, name=name,
                      scale_init=init(nn.initializers.ones_init()))
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name,
                      scale_init=init(nn.initializers.ones_init()),
                      bias_init=init(nn.initializers.zeros_init()))


@register_mixer("attention")
class Attention(nn.Module):
  """Full multi-head self-attention (the DiT mixer), see `attention`.

  Options of the "modern DiT" recipes (LightningDiT): `qk_norm` normalises
  queries and keys per head ("rms" or "layer"); `rope` rotates them by the
  axial rotary embedding of the token grid (embed.rotary_tables), on top of
  the backbone's absolute sin-cos embedding. `rope_base_grid` and
  `rope_extrapolation` extend the rotations to a grid larger than the
  trained one (the backbone sets them from its base_grid, extrapolation).
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  impl: str = "auto"  # pallas_kernels.dot_product_attention's
  qk_norm: str | None = None
  rope: bool = False
  rope_base_grid: Any = None
  rope_extrapolation: str = "extrapolate"

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del deterministic
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm must be one of {QK_NORMS}, got "
                       f"{self.qk_norm!r}")
    q, k, v = qkv_projection(x, self.num_heads, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    if self.qk_norm:
      q = qk_norm(self.qk_norm, "q_norm")(q).astype(self.dtype)
      k = qk_norm(self.qk_norm, "k_norm")(k).astype(self.dtype)
    if self.rope:
      cos, sin = embed.rotary_tables(
          grid_shape, q.shape[-1], base_grid=self.rope_base_grid,
          extrapolation=self.rope_extrapolation)
      q, k = embed.apply_rotary(q, cos, sin), embed.apply_rotary(k, cos, sin)
    o = attention(q, k, v, self.impl)
    return out_projection(o, dtype=self.dtype, param_dtype=self.param_dtype)
