"""Benchmark: steady-state training throughput and MFU of the real train step.

Builds what jdit.train.run builds (jdit.train_state.create_state and
make_train_step: DDPM or flow loss, label dropout, AdamW, EMA, donated state)
over a jdit.sharding mesh (data=-1 by default) on every device present, feeds
one synthetic batch of SD-VAE-shaped latents, runs warm-up steps (compile),
then times --steps steps and blocks on the result. Prints one JSON line:

  images_per_sec, step_time_ms, train_flops_per_image (3x the forward: the
  analytic jdit.models.flops count, else XLA's cost analysis of the compiled
  step), achieved TFLOP/s per device, and MFU against (a) the bf16 matmul
  peak measured in the same process (a chain of large jnp.dot on one device)
  and (b) the datasheet dense bf16 peak of the device kind; device, jax.

GPU/TPU: python bench/train_step.py --model DiT-XL/2 --image_size 256 \\
             --batch_size 256 --dtype bfloat16 [--remat none] [--steps 20]
CPU:     python bench/train_step.py --smoke [--model LaMamba-Diff-S]
         # the model at its family's smoke size (e.g. a 1-block width-32
         # DiT; jdit.models.registry.smoke_overrides), 64px, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jdit import diffusion, sharding
from jdit import train_state as ts
from jdit.models import build_model, flops as flops_fn
from jdit.models.registry import smoke_overrides

import profile_summary  # bench/, beside this script
from timing import sig

PROFILE_STEPS = 3

# Dense bf16 peak TFLOP/s per chip (vendor datasheets; no sparsity).
DATASHEET_TFLOPS = (
    ("h100 pcie", 756.0), ("h100", 989.4), ("h200", 989.4), ("gh200", 989.4),
    ("a100", 312.0), ("tpu v4", 275.0), ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0), ("tpu v5p", 459.0), ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0), ("tpu v6e", 918.0),
)


def datasheet_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, peak in DATASHEET_TFLOPS:
    if key in kind:
      return peak
  return None


def matmul_peak_tflops(n: int, iters: int, repeats: int = 3) -> float:
  """bf16 TFLOP/s of a chain of n x n matmuls on the first device."""
  dev = jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n),
                                       jnp.bfloat16), dev)
  # ~orthogonal scale keeps the chain's magnitude roughly constant.
  b = jax.device_put((jax.random.normal(jax.random.key(1), (n, n))
                      / math.sqrt(n)).astype(jnp.bfloat16), dev)

  @jax.jit
  def chain(a, b):
    return jax.lax.fori_loop(0, iters, lambda _, c: jnp.dot(
        c, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16), a)

  jax.block_until_ready(chain(a, b))  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(chain(a, b))
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 * iters / min(times) / 1e12


def _optim(total_steps):
  # The DiT recipe (configs/dit_imagenet256.py); the optimizer's cost does
  # not depend on the values.
  return ts.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0,
      warmup_steps=0, schedule="constant")), total_steps)[0]


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _profile_classes(trace_dir: str) -> dict | None:
  """Device ms per step by kernel class; the full table goes to stderr."""
  try:
    summary = profile_summary.summarize(trace_dir)
  except ValueError as e:  # no device tracks (a CPU run)
    print(f"profile: {e}", file=sys.stderr)
    return None
  print(profile_summary.render(summary, top=30), file=sys.stderr)
  return {label: round(us / 1e3 / PROFILE_STEPS, 3)
          for label, us in summary["classes"]}


def bench(args) -> dict:
  overrides = smoke_overrides(args.model) if args.smoke else {}
  pixel = args.pixel
  input_size = args.image_size if pixel else args.image_size // 8
  if not pixel and args.image_size % 8:
    raise ValueError(f"--image_size {args.image_size} must be a multiple of "
                     f"8 (the SD-VAE's downsampling) unless --pixel")
  overrides.update(input_size=input_size, in_channels=3 if pixel else 4,
                   learn_sigma=args.objective == "ddpm")
  model = build_model(args.model, dtype=args.dtype, remat=args.remat,
                      **overrides)
  objective = diffusion.create(args.objective, diffusion.default_config(),
                               learn_sigma=model.learn_sigma)
  mesh = sharding.create_mesh({"data": -1, "fsdp": args.fsdp})
  rules = sharding.DEFAULT_RULES
  par = sharding.batch_parallelism(mesh)
  if args.batch_size % (par * args.grad_accum):
    raise ValueError(f"--batch_size {args.batch_size} must be divisible by "
                     f"{par} devices x --grad_accum {args.grad_accum}")
  tx = _optim(args.warmup + args.steps)
  state = ts.create_state(model, tx, mesh, rules, seed=0)
  step = ts.make_train_step(model, objective, tx, ema_decay=0.9999,
                            grad_accum=args.grad_accum, seed=0, mesh=mesh,
                            rules=rules)
  h = w = input_size
  local = args.batch_size // jax.process_count()
  rng = np.random.default_rng(jax.process_index())
  batch = sharding.global_batch({
      "x": rng.standard_normal((local, h, w, model.in_channels), np.float32),
      "y": rng.integers(0, model.num_classes, local).astype(np.int32)}, mesh)

  with sharding.use_mesh(mesh, rules):
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla = _xla_flops(compiled)
    # The AOT-compiled executable itself: a later step(...) call would not
    # find it in jit's cache and would compile again.
    step = compiled
    for _ in range(max(args.warmup, 1)):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    t_all = time.perf_counter()
    for _ in range(args.steps):
      t = time.perf_counter()
      state, metrics = step(state, batch)
      if args.sync_each_step:
        jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    jax.block_until_ready((state, metrics))
    total = time.perf_counter() - t_all
    if args.profile:
      with jax.profiler.trace(args.profile, create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
          state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"loss is {loss}; the benchmark is invalid")

  n_dev = jax.device_count()
  step_s = total / args.steps
  images_per_sec = args.batch_size / step_s
  try:
    fwd = flops_fn(args.model, input_size,
                   **{k: v for k, v in overrides.items()
                      if k not in ("input_size", "learn_sigma")},
                   learn_sigma=model.learn_sigma)
    train_flops, source = 3.0 * fwd, "analytic (3x forward)"
  except ValueError:  # a mixer without an analytic count: XLA's below
    train_flops, source = None, None
  # The compiled SPMD program is one device's share of the global batch.
  xla_per_image = xla * n_dev / args.batch_size if xla else None
  if train_flops is None:
    train_flops, source = xla_per_image, "xla cost_analysis"
  kind = jax.devices()[0].device_kind
  out = {
      "what": "train_step", "model": args.model,
      "smoke": bool(args.smoke), "image_size": args.image_size,
      "input_size": input_size, "tokens": model.grid_shape[0]
      * model.grid_shape[1], "batch_size": args.batch_size,
      "dtype": args.dtype, "remat": args.remat,
      "objective": args.objective, "grad_accum": args.grad_accum,
      "devices": n_dev, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "device": kind, "platform": jax.devices()[0].platform,
      "jax": jax.__version__, "steps": args.steps, "warmup": args.warmup,
      "compile_s": round(compile_s, 2),
      "step_time_ms": round(step_s * 1e3, 3),
      "images_per_sec": round(images_per_sec, 3),
      "images_per_sec_per_device": round(images_per_sec / n_dev, 3),
      "loss": round(loss, 5),
      "train_gflops_per_image": sig(train_flops and train_flops / 1e9),
      "flops_source": source,
      "xla_train_gflops_per_image": sig(xla_per_image
                                         and xla_per_image / 1e9),
  }
  if args.profile:
    out["profile"] = _profile_classes(args.profile)
  if args.sync_each_step:
    out["step_time_ms_median"] = round(statistics.median(times) * 1e3, 3)
  achieved = (train_flops * images_per_sec / n_dev / 1e12
              if train_flops else None)
  out["achieved_tflops_per_device"] = sig(achieved)
  peak = None
  if args.matmul_size:
    peak = matmul_peak_tflops(args.matmul_size, args.matmul_iters)
  sheet = datasheet_tflops(kind)
  out.update(
      matmul_peak_tflops=sig(peak),
      mfu_vs_matmul_peak=sig(achieved and peak and achieved / peak),
      datasheet_peak_tflops=sheet,
      mfu_vs_datasheet=sig(achieved and sheet and achieved / sheet))
  return out


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="DiT-XL/2", help="a build_model name")
  p.add_argument("--image_size", type=int, default=256,
                 help="pixels; the model sees image_size/8 latents")
  p.add_argument("--pixel", action="store_true",
                 help="pixel-space model (input_size = image_size, 3 ch)")
  p.add_argument("--batch_size", type=int, default=256, help="global")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--remat", default="none",
                 help="none | full | dots_saveable | offload")
  p.add_argument("--objective", default="ddpm", choices=("ddpm", "flow"))
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp axis size")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--sync_each_step", action="store_true",
                 help="also block per step (adds host latency) for a median")
  p.add_argument("--matmul_size", type=int, default=8192,
                 help="n of the n x n bf16 peak matmul; 0 skips it")
  p.add_argument("--matmul_iters", type=int, default=50)
  p.add_argument("--profile", default="",
                 help="trace 3 more steps into this dir; adds device ms "
                      "per step by kernel class (bench/profile_summary.py)")
  p.add_argument("--smoke", action="store_true",
                 help="the model at its smoke size (its family's "
                      "smoke_overrides) at 64px, float32, CPU")
  args = p.parse_args(argv)
  if args.smoke:
    defaults = {k: p.get_default(k) for k in vars(args)}
    for key, value in dict(image_size=64, batch_size=2 * jax.device_count(),
                           dtype="float32", steps=3, warmup=1,
                           matmul_size=256, matmul_iters=4,
                           model="DiT-S/4").items():
      if getattr(args, key) == defaults[key]:
        setattr(args, key, value)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  sharding.maybe_initialize_distributed()
  try:
    out = bench(args)
  except Exception as e:  # pylint: disable=broad-except  (e.g. OOM)
    out = {"what": "error", "model": args.model, "image_size":
           args.image_size, "batch_size": args.batch_size, "dtype": args.dtype,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "error": f"{type(e).__name__}: {e}"[:500]}
    print(json.dumps(out), flush=True)
    raise SystemExit(1) from e
  if jax.process_index() == 0:
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
