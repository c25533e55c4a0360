"""Benchmark: host time to trace a model's training gradient.

`jax.lax.platform_dependent` traces the branch of every platform, so each
kernel call with impl="auto" traces the GPU and TPU Pallas kernels (and their
VJPs under grad) whichever device runs. pallas_kernels shares one jit per
kernel configuration (`_backend._shared_jit`), so a model's identical blocks
trace them once. This times `jax.jit(grad).trace` of each model with that
sharing and, as the baseline in the same process, with every call traced
anew, alternating the two. Tracing is Python on the host: it delays the
first step (and every retrace) the same on any accelerator.

Prints one JSON line per model: what, model, input_size, jax, trace_s
(shared, the best of --repeats), unshared_trace_s, speedup.

  python bench/trace.py            # DiT-XL/2-local, DiM-XL/2, LaMamba-Diff-XL
  python bench/trace.py --models DiT-XL/2-linear --input_size 64
  python bench/trace.py --smoke    # the first model at its smoke size, once
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp

from jdit import models
from jdit.models.registry import smoke_overrides
from pallas_kernels import _backend

DEFAULT_MODELS = ("DiT-XL/2-local", "DiM-XL/2", "LaMamba-Diff-XL")


@contextlib.contextmanager
def _unshared():
  """Every kernel call gets its own trace (the baseline)."""
  shared = _backend._shared_jit  # pylint: disable=protected-access
  _backend._shared_jit = lambda fn: fn  # pylint: disable=protected-access
  try:
    yield
  finally:
    _backend._shared_jit = shared  # pylint: disable=protected-access


def trace_seconds(model, batch: int = 2) -> float:
  """Seconds to trace d mean(out^2) / d params, from a cold kernel cache."""
  _backend._JITS.clear()  # pylint: disable=protected-access
  x = jax.ShapeDtypeStruct((batch,) + tuple(model.input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)

  def loss(p, x, t, y):  # a new function each time: no trace is reused
    return jnp.mean(model.apply(p, x, t, y) ** 2)

  start = time.perf_counter()
  jax.jit(jax.grad(loss)).trace(params, x, t, y)
  return time.perf_counter() - start


def measure(name: str, input_size: int | None, smoke: bool,
            repeats: int) -> dict:
  kw = dict(smoke_overrides(name), input_size=8) if smoke else {}
  if input_size:
    kw["input_size"] = input_size
  model = models.build_model(name, **kw)
  shared, unshared = [], []
  for _ in range(repeats):
    with _unshared():
      unshared.append(trace_seconds(model))
    shared.append(trace_seconds(model))
  best, base = min(shared), min(unshared)
  return {"what": "trace", "model": name, "input_size": kw.get(
      "input_size", model.input_shape[0]), "smoke": smoke,
          "jax": jax.__version__, "trace_s": round(best, 3),
          "unshared_trace_s": round(base, 3), "speedup": round(base / best, 2)}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(DEFAULT_MODELS))
  p.add_argument("--input_size", type=int, default=None,
                 help="latent side; default: the model's own")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  names = args.models.split(",")
  if args.smoke:
    names, args.repeats = names[:1], 1
  for name in names:
    print(json.dumps(measure(name, args.input_size, args.smoke,
                             args.repeats)), flush=True)


if __name__ == "__main__":
  main()
