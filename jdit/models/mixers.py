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
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def qkv_projection(x, num_heads, *, dtype, param_dtype, name="qkv"):
  """(B, L, D) -> q, k, v each (B, L, heads, head_dim); one fused matmul."""
  d = x.shape[-1]
  if d % num_heads:
    raise ValueError(f"hidden size {d} is not divisible by num_heads="
                     f"{num_heads}")
  # Kernel (D, 3, heads, head_dim) so that tensor parallelism shards heads.
  qkv = nn.DenseGeneral(
      (3, num_heads, d // num_heads), dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          _xavier_fused(3 * d), ("embed", None, "heads", "kv")),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (None, "heads", "kv")),
      name=name)(x)
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def out_projection(o, *, dtype, param_dtype, name="proj"):
  """(B, L, heads, head_dim) -> (B, L, D)."""
  heads, head_dim = o.shape[-2:]
  return nn.DenseGeneral(
      heads * head_dim, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          _xavier_fused(heads * head_dim), ("heads", "kv", "embed")),
      bias_init=nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ("embed",)),
      name=name)(o)


def _xavier_fused(fan_out: int):
  """Xavier-uniform for a DenseGeneral kernel, with the fans of the 2D matrix.

  DiT initialises the fused (D -> 3D) qkv Linear with xavier_uniform over the
  flat (in, out) matrix; this keeps that distribution for the split kernel.
  """

  def init(key, shape, dtype=jnp.float32):
    fan_in = 1
    for s in shape:
      fan_in *= s
    fan_in //= fan_out
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


@register_mixer("attention")
class Attention(nn.Module):
  """Full multi-head self-attention (the DiT mixer).

  Uses jax.nn.dot_product_attention, which picks cuDNN flash attention on GPU
  for bf16/f16 inputs and XLA elsewhere; softmax statistics are float32.
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid_shape, deterministic=True):
    del grid_shape, deterministic
    q, k, v = qkv_projection(x, self.num_heads, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    o = jax.nn.dot_product_attention(q, k, v)
    return out_projection(o, dtype=self.dtype, param_dtype=self.param_dtype)
