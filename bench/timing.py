"""Timing helpers shared by the benchmarks in bench/."""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp


def sig(x: float | None, digits: int = 4) -> float | None:
  """x rounded to `digits` significant digits (None and 0 give None)."""
  return float(f"{x:.{digits}g}") if x else None


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


def time_bandwidth(rec: dict, fn, args, iters: int, nbytes: int,
                   copy_gbs: float) -> float | None:
  """Times fn(*args) into `rec` (ms, roof bytes, GB/s, ratio to copy).

  Returns the time in ms, or None after printing `rec` with the error (an
  out-of-memory baseline, say) so that the sweep goes on.
  """
  try:
    ms = time_ms(fn, args, iters)
  except Exception as e:  # pylint: disable=broad-except
    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(rec), flush=True)
    return None
  gbs = nbytes / ms / 1e6
  rec.update(ms=round(ms, 4), roof_bytes=nbytes, gbs=round(gbs, 2),
             copy_gbs=round(copy_gbs, 2), copy_ratio=round(gbs / copy_gbs, 4))
  return ms
