"""Pallas kernels under a device mesh: each kernel call runs in shard_map.

XLA cannot partition a pallas_call: on GPU and TPU it is an opaque custom
call, so under a sharded jit the partitioner all-gathers its operands and
every device runs the whole global batch (and every head). The mixers
therefore call kernels through `kernel(name)`, which, when a mesh is set
(`jdit.sharding.use_mesh`), runs the kernel inside `jax.shard_map` over the
dimensions it treats independently: the batch (the `act_batch` rule) and the
heads or channels (the `heads` / `mlp` rules, i.e. tensor parallelism).
Axes whose size does not divide a dimension are left out of that dimension
(it is replicated instead), so odd batches still run, only less parallel.
Without a mesh, or on a mesh of one device, the kernel is called directly.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax

import pallas_kernels
from jdit import sharding

P = jax.sharding.PartitionSpec


def _attention_layout(arrays, mesh, options):
  """q, k, v and the output: (B, N or M, heads, head_dim), split alike."""
  del options
  specs = {k: _fit(("act_batch", None, "heads", None), v.shape, mesh)
           for k, v in arrays.items()}
  return specs, specs["q"]


def _scan_layout(arrays, mesh, options):
  """Selective-scan operands (shared/DESIGN.md layout) and outputs.

  Channels are split over the tensor axis only when every shard's channels
  stay inside whole B/C groups: groups == 1 (B and C replicated) or the
  axis divides the groups (B and C split along them).
  """
  dim, groups = arrays["u"].shape[-1], arrays["B"].shape[2]
  tensor = sharding.axis_size(mesh, "tensor")
  split = (tensor > 1 and dim % tensor == 0
           and (groups == 1 or groups % tensor == 0))
  ch = "mlp" if split else None
  seq = ("act_batch", None, ch)
  bc = ("act_batch", None, ch if groups > 1 else None, None)
  logical = {"u": seq, "delta": seq, "z": seq, "A": (ch, None), "B": bc,
             "C": bc, "D": (ch,), "delta_bias": (ch,)}
  specs = {k: _fit(logical[k], v.shape, mesh) for k, v in arrays.items()}
  y = specs["u"]
  if not options.get("return_last_state", False):
    return specs, y
  # The last state (B, dim, state) splits like u's batch and A's channels.
  return specs, (y, P(y[0], specs["A"][0], None))


# name -> (array argument names in signature order, layout function)
_LAYOUTS = {
    "dot_product_attention": (("q", "k", "v"), _attention_layout),
    "local_attention": (("q", "k", "v"), _attention_layout),
    "linear_attention": (("q", "k", "v"), _attention_layout),
    "selective_scan": (("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
                       _scan_layout),
}


def _fit(logical, shape, mesh):
  """Mesh PartitionSpec of `logical` names, keeping axes that divide."""
  entries = []
  for entry, size in zip(nn.logical_to_mesh_axes(logical), shape):
    axes = entry if isinstance(entry, tuple) else (entry,)
    kept, prod = [], 1
    for axis in axes:
      n = sharding.axis_size(mesh, axis) if axis is not None else 1
      if n > 1 and size % (prod * n) == 0:
        kept.append(axis)
        prod *= n
    entries.append(tuple(kept) if len(kept) > 1 else
                   (kept[0] if kept else None))
  return P(*entries)


def kernel(name: str):
  """`pallas_kernels.<name>`, run per shard when a multi-device mesh is set.

  The returned function has the kernel's signature (arrays positionally or
  as keywords, options as keywords).
  """
  if name not in _LAYOUTS:
    raise ValueError(f"kernel(): no sharding layout for {name!r}; known: "
                     f"{sorted(_LAYOUTS)}")
  fn = getattr(pallas_kernels, name)
  arg_names, layout = _LAYOUTS[name]

  @functools.wraps(fn)
  def call(*args, **kwargs):
    arrays = dict(zip(arg_names, args))
    for key in arg_names:
      if key in kwargs:
        arrays[key] = kwargs.pop(key)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    mesh = sharding.context_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
      return fn(**arrays, **kwargs)
    in_specs, out_specs = layout(arrays, mesh, kwargs)
    # The body is per shard with no collectives; pallas_call outputs carry
    # no varying-axes annotations for shard_map's check to use.
    return sharding.shard_map_call(lambda a: fn(**a, **kwargs), (arrays,),
                                   (in_specs,), out_specs, mesh,
                                   check_vma=False)

  return call
