"""Benchmark: sampling throughput of a model with classifier-free guidance.

Times what `python sample.py` runs: `jdit.sampling.Sampler` (one jitted
function: noise, every denoising step with CFG, which doubles the model
batch) on every device present, in latent space (the VAE decode is left out,
it is the same for every backbone). Params are the model's initialisation
plus small noise, so no layer multiplies by exact zeros. Prints one JSON
line: images/s, ms per denoising step, model forwards per second, and
forward FLOPs x forwards/s (achieved TFLOP/s per device). With
--cache_interval N (or --cache_router FILE, a schedule learned by
jdit.learn_cache for this sampler and step count) it also times
feature-cached sampling (jdit.feature_cache) and prints its images/s and
the speed-up over the uncached run.

GPU/TPU: python bench/sampling.py --model DiT-XL/2 --image_size 256 \\
             --batch_size 64 --sampler ddim --steps 50 --cfg_scale 1.5
         python bench/sampling.py --model DiT-XL/2 --steps 50 --cache_interval 3
CPU:     python bench/sampling.py --smoke
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdit import diffusion, feature_cache, learn_cache, sampling, sharding
from jdit.models import build_model, flops
from jdit.models.registry import smoke_overrides

from timing import sig  # bench/, beside this script


def _perturbed_init(model, seed: int = 0):
  x = jnp.zeros((1,) + model.input_shape)
  params = model.init(jax.random.key(seed), x, jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
      for p, k in zip(leaves, keys)])


def _time(sampler, labels, repeats) -> tuple[float, float]:
  """(compile + first run seconds, best of `repeats` timed runs)."""
  t0 = time.perf_counter()
  sampler(jax.random.key(0), labels)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    sampler(jax.random.key(i + 1), labels)  # returns host arrays: synced
    times.append(time.perf_counter() - t)
  return compile_s, min(times)


def bench(args) -> dict:
  overrides = smoke_overrides(args.model) if args.smoke else {}
  input_size = args.image_size // 8
  model = build_model(args.model, dtype=args.dtype, input_size=input_size,
                      in_channels=4, learn_sigma=args.objective == "ddpm",
                      **overrides)
  objective = diffusion.create(args.objective, diffusion.default_config(),
                               learn_sigma=model.learn_sigma)
  mesh = sharding.create_mesh({"data": -1})
  par = sharding.batch_parallelism(mesh)
  if args.batch_size % par:
    raise ValueError(f"--batch_size {args.batch_size} must be divisible by "
                     f"the {par} devices")
  params = _perturbed_init(model)
  guidance = diffusion.Guidance(scale=args.cfg_scale,
                                null_label=model.num_classes)
  kw = dict(mesh=mesh, sampler=args.sampler or None,
            steps=args.steps or None, guidance=guidance)
  sampler = sampling.Sampler(model, objective, params, **kw)
  labels = np.arange(args.batch_size) % model.num_classes
  compile_s, best = _time(sampler, labels, args.repeats)
  evaluations = objective.evaluations(sampler.sampler, sampler.steps)
  cache_row = {}
  if args.cache_router:
    cache = learn_cache.load_router(args.cache_router, sampler.sampler,
                                    sampler.steps)
  else:
    cache = feature_cache.FeatureCache(args.cache_interval,
                                       warmup=args.cache_warmup)
  if cache.active:
    # The cached sampler timed in the same process as the baseline above.
    cached = sampling.Sampler(model, objective, params, cache=cache, **kw)
    _, cached_best = _time(cached, labels, args.repeats)
    blocks = len(cache.schedule[0]) if cache.schedule else 1
    cache_row = {
        "cache_interval": args.cache_interval,
        "cache_warmup": args.cache_warmup,
        "cache_router": args.cache_router or None,
        "blocks_computed": sig(cache.computed_fraction(evaluations, blocks)),
        "cached_images_per_sec": sig(args.batch_size / cached_best),
        "cache_speedup": sig(best / cached_best)}
  cfg = args.cfg_scale != 1.0
  forwards = evaluations * args.batch_size * (2 if cfg else 1)
  gflops = flops(args.model, input_size, **overrides) / 1e9 if (
      not args.smoke) else None
  dev = jax.devices()[0]
  return {
      "what": "sampling", "model": args.model, "image_size": args.image_size,
      "batch_size": args.batch_size, "sampler": sampler.sampler,
      "steps": sampler.steps, "cfg": cfg, "dtype": args.dtype,
      "images_per_sec": sig(args.batch_size / best),
      "ms_per_step": sig(best / sampler.steps * 1e3),
      "forwards_per_sec": sig(forwards / best),
      "tflops_per_device": sig(
          gflops * forwards / best / 1e3 / jax.device_count())
                           if gflops else None,
      "compile_s": round(compile_s, 1), "devices": jax.device_count(),
      "platform": dev.platform, "device": dev.device_kind,
      "jax": jax.__version__, "smoke": bool(args.smoke), **cache_row}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="DiT-XL/2", help="a build_model name")
  p.add_argument("--image_size", type=int, default=256,
                 help="pixels; the model sees image_size/8 latents")
  p.add_argument("--batch_size", type=int, default=64, help="global")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype")
  p.add_argument("--objective", default="ddpm", choices=("ddpm", "flow"))
  p.add_argument("--sampler", default="ddim", help="'' = the default")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--cfg_scale", type=float, default=1.5)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--cache_interval", type=int, default=1,
                 help="> 1: also time feature-cached sampling (FORA: every "
                 "block recomputed every N evaluations) against the baseline")
  p.add_argument("--cache_warmup", type=int, default=0,
                 help="evaluations computed in full before caching starts")
  p.add_argument("--cache_router", default="",
                 help="a jdit.learn_cache router file: time its learned "
                 "schedule against the baseline")
  p.add_argument("--smoke", action="store_true",
                 help="tiny model, 64px, one image per device, 2 steps")
  args = p.parse_args()
  if args.smoke:
    args.image_size, args.steps = 64, 2
    args.batch_size = jax.device_count()  # one image per device
    args.dtype, args.repeats = "float32", 1
  print(json.dumps(bench(args)))


if __name__ == "__main__":
  main()
