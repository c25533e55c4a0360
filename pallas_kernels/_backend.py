"""Backend selection shared by every kernel in this package.

Each public kernel entry point takes `impl`:
  "reference"  pure jnp, runs anywhere (the oracle and the CPU path);
  "pallas"     the Pallas kernel; on CPU it runs in interpret mode;
  "auto"       Pallas on GPU/TPU, reference elsewhere.
The platform is chosen at lowering time with `jax.lax.platform_dependent`, so
`jax.export(..., platforms=("cuda",))` from a CPU machine lowers the real GPU
kernel (and ("tpu",) the Mosaic one) rather than whatever the host runs.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Hashable

import jax
from jax import export as jax_export
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

IMPLS = ("auto", "pallas", "reference")


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def select(impl: str, *, reference: Callable, gpu: Callable, tpu: Callable,
           interpret: Callable) -> Callable:
  """Returns one callable that runs the right variant on each platform.

  Args:
    impl: "auto", "pallas" or "reference".
    reference: the pure-jnp implementation.
    gpu: the Pallas Triton kernel (compiled for CUDA/ROCm).
    tpu: the Pallas Mosaic kernel.
    interpret: the Pallas kernel in interpret mode (what "pallas" means on CPU).
  """
  check_impl(impl)
  if impl == "reference":
    return reference
  gpu, tpu = _shared_jit(gpu), _shared_jit(tpu)
  host = _shared_jit(interpret) if impl == "pallas" else reference

  def run(*args):
    return jax.lax.platform_dependent(
        *args, cpu=host, cuda=gpu, rocm=gpu, tpu=tpu, default=host)

  return run


# Every branch of `platform_dependent` is traced, whichever runs, so each call
# traces the Pallas kernels of both accelerators (and their VJPs under grad).
# Equal kernels share one jit, whose trace is cached per input shapes: the 28
# identical blocks of DiT-XL/2-local trace them once, not 28 times.
_JITS: dict[Hashable, Callable] = {}


def _value_key(fn: Callable) -> Hashable | None:
  """`fn` as a hashable value: a function, or a partial of one with hashable
  arguments (compared by value); None when some argument is unhashable."""
  key = fn
  if isinstance(fn, functools.partial):
    inner = _value_key(fn.func)
    key = None if inner is None else (
        inner, fn.args, tuple(sorted(fn.keywords.items())))
  try:
    hash(key)
  except TypeError:
    return None
  return key


def _shared_jit(fn: Callable) -> Callable:
  key = _value_key(fn)
  if key is None:
    return fn
  if key not in _JITS:
    _JITS[key] = jax.jit(fn)
  return _JITS[key]


def gpu_params(num_warps: int = 4, num_stages: int = 2) -> plgpu.CompilerParams:
  """Explicit Triton params: jax 0.10 defaults Pallas GPU to Mosaic GPU."""
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(*dimension_semantics: str) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))


# The GPU that CUDA exports from a host without one compile the Triton kernels
# for: since jax 0.11 the Triton lowering asks the device for its compute
# capability, and on a CPU host only an abstract device can answer.
EXPORT_GPU = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
TRITON_CALL = jax_export.DisabledSafetyCheck.custom_call(
    "__gpu$xla.gpu.triton")


@contextlib.contextmanager
def gpu_lowering_target(device: jax.sharding.AbstractDevice = EXPORT_GPU):
  """Lowers GPU kernels for `device` inside the block, whatever the host.

  Keeps the axes of the current mesh (`jax.set_mesh`), so sharded programs
  export too. Only needed on a host without that GPU.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    target = jax.sharding.AbstractMesh((1,), ("_",), abstract_device=device)
  else:
    target = mesh.update(abstract_device=device)
  with jax.sharding.use_abstract_mesh(target):
    yield


def export_for(jitted: Callable, platform: str, *args,
               gpu: jax.sharding.AbstractDevice = EXPORT_GPU):
  """`jax.export` of a jitted function for one platform, from any host.

  For "cuda"/"rocm" the Triton lowering targets `gpu` (an H100 by default)
  and the Triton custom call is allowed in the export (it is not one of
  jax.export's stable custom calls). Returns the `jax.export.Exported`.
  """
  if platform not in ("cuda", "rocm"):
    return jax_export.export(jitted, platforms=(platform,))(*args)
  args = jax.tree.map(functools.partial(_on_device, device=gpu), args)
  with gpu_lowering_target(gpu):
    return jax_export.export(jitted, platforms=(platform,),
                             disabled_checks=[TRITON_CALL])(*args)


def _on_device(arg, device: jax.sharding.AbstractDevice):
  """A sharded argument as an abstract value on `device`'s mesh.

  The function is traced under the abstract GPU mesh, so values it makes
  (an iota, a PRNG key) live there; arguments left on the host's mesh would
  meet them in one op on two meshes, which jax rejects.
  """
  s = getattr(arg, "sharding", None)
  if not isinstance(s, jax.sharding.NamedSharding):
    return arg
  mesh = s.mesh.abstract_mesh.update(abstract_device=device)
  return jax.ShapeDtypeStruct(arg.shape, arg.dtype,
                              sharding=jax.sharding.NamedSharding(
                                  mesh, s.spec, memory_kind=s.memory_kind))
