"""Timing helpers shared by the benchmarks in bench/."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def time_ms(fn, args, iters: int, warmup: int = 2) -> float:
  """Median wall time of fn(*args) in ms, after `warmup` calls (the first
  compiles); every call is waited for with block_until_ready."""
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def copy_bandwidth_gbs(nbytes: int, iters: int) -> float:
  """Device copy bandwidth: read + write of an nbytes float32 buffer."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  ms = time_ms(jax.jit(lambda x: x + 1), (x,), iters)
  return 2 * nbytes / ms / 1e6
