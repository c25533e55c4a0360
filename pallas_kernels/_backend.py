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

from typing import Callable

import jax
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
  host = interpret if impl == "pallas" else reference

  def run(*args):
    return jax.lax.platform_dependent(
        *args, cpu=host, cuda=gpu, rocm=gpu, tpu=tpu, default=host)

  return run


def gpu_params(num_warps: int = 4, num_stages: int = 2) -> plgpu.CompilerParams:
  """Explicit Triton params: jax 0.10 defaults Pallas GPU to Mosaic GPU."""
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(*dimension_semantics: str) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))
