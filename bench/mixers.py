"""Benchmark: efficient DiT families vs DiT at the same width and depth.

For each resolution (256/512/1024px = 256/1024/4096 tokens at patch 2 on
SD-VAE latents) and each token mixer, builds the same DiT backbone with that
mixer and times the forward pass and one training step (loss, gradients and
an Adam update), and reports the analytic FLOPs (jdit.models.flops).

Prints one JSON line per measurement: what (forward | train_step), mixer,
model, resolution, tokens, batch, dtype, device, jax, time_ms (median),
gflops_per_image (forward, analytic, 2 per multiply-add; training counts 3x
forward), tflops (achieved), and speedup = DiT time / this time, measured in
the same process. A family that fails (e.g. out of memory) prints "error".

GPU:  python bench/mixers.py                      # DiT-B/2 width/depth
      python bench/mixers.py --model DiT-XL/2 --batch 4 --dtype bfloat16
CPU:  python bench/mixers.py --smoke              # tiny, a minute or two
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

from timing import time_ms
from jdit import models
from jdit.models.flops import model_macs

# Mixer options at 256px and up (a 16x16 token grid or larger).
FAMILIES = {
    "attention": {},
    "local": {"window": 8, "shape": "circle"},
    "window": {"window": 8, "shift": 4},
    "linear": {"feature_map": "relu", "conv_kernel": 3},
    "mamba": {"scan_order": "zigzag"},
    "proxy": {"proxy_grid": 8},  # PT-DiT: 8x8 proxies at every resolution
    "kv_compress": {"ratio": 2},
}
KERNEL_MIXERS = ("local", "linear", "mamba")  # take impl=


def _options(mixer, grid_side, impl):
  opts = dict(FAMILIES[mixer])
  for key in ("window",):  # windows must fit (and divide) small smoke grids
    if key in opts and mixer != "local":
      opts[key] = min(opts[key], grid_side)
      if "shift" in opts:
        opts["shift"] = opts[key] // 2
  if mixer == "proxy":  # fewer proxies only where the grid is smaller
    opts["proxy_grid"] = min(opts["proxy_grid"], grid_side)
  if mixer in KERNEL_MIXERS:
    opts["impl"] = impl
  return opts


def bench_one(name, mixer, input_size, args):
  overrides = dict(input_size=input_size, mixer=mixer, dtype=args.dtype,
                   mixer_options=_options(mixer, input_size // 2, args.impl))
  if args.depth:
    overrides["depth"] = args.depth
  if args.width:
    overrides.update(hidden_size=args.width, num_heads=args.heads)
  model = models.build_model(name, **overrides)
  b, c = args.batch, model.in_channels
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (b, input_size, input_size, c))
  t = jnp.linspace(0, 999, b)
  y = jnp.arange(b) % 1000 % model.num_classes
  params = jax.jit(model.init)(key, x, t, y)
  tx = optax.adam(1e-4)
  opt_state = tx.init(params)

  fwd = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y))

  @jax.jit
  def train_step(p, s, x, t, y):
    def loss(p):
      out = model.apply(p, x, t, y, train=True,
                        rngs={"dropout": jax.random.PRNGKey(1)})
      return jnp.mean((out[..., :c] - x) ** 2)
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  macs = model_macs(model)
  out = {}
  out["forward"] = (time_ms(fwd, (params, x, t, y), args.iters, args.warmup),
                    2.0 * macs)
  out["train_step"] = (time_ms(train_step, (params, opt_state, x, t, y),
                                args.iters, args.warmup), 6.0 * macs)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="DiT-B/2",
                      help="DiT backbone whose width/depth every mixer uses")
  parser.add_argument("--mixers", default=",".join(FAMILIES))
  parser.add_argument("--resolutions", default="256,512,1024",
                      help="pixel sides; latents are 8x smaller")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--impl", default="auto", help="kernel impl for "
                      "local/linear/mamba: auto | pallas | reference")
  parser.add_argument("--depth", type=int, default=0)
  parser.add_argument("--width", type=int, default=0)
  parser.add_argument("--heads", type=int, default=0)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny CPU run: width 64, depth 2, 64/128px")
  args = parser.parse_args(argv)
  if args.smoke:
    args.depth, args.width, args.heads = 2, 64, 4
    args.batch, args.warmup, args.iters = 2, 1, 2
    args.dtype = "float32"
    if args.resolutions == parser.get_default("resolutions"):
      args.resolutions = "64,128"
  device = jax.devices()[0].device_kind
  mixers = [m.strip() for m in args.mixers.split(",")]
  if "attention" in mixers:  # the baseline first, for the speedups
    mixers = ["attention"] + [m for m in mixers if m != "attention"]
  for res in [int(r) for r in args.resolutions.split(",")]:
    input_size = res // 8
    base = {}
    for mixer in mixers:
      row = dict(mixer=mixer, model=args.model, width=args.width or None,
                 depth=args.depth or None, resolution=res,
                 tokens=(input_size // 2) ** 2, batch=args.batch,
                 dtype=args.dtype, device=device, jax=jax.__version__)
      try:
        results = bench_one(args.model, mixer, input_size, args)
      except Exception as e:  # pylint: disable=broad-except
        print(json.dumps({"what": "error", **row,
                          "error": f"{type(e).__name__}: {e}"[:300]}),
              flush=True)
        continue
      for what, (ms, flops) in results.items():
        if mixer == "attention":
          base[what] = ms
        rec = {"what": what, **row, "time_ms": round(ms, 3),
               "gflops_per_image": round(flops / 3e9 if what == "train_step"
                                         else flops / 1e9, 3),
               "tflops": round(flops * args.batch / (ms * 1e-3) / 1e12, 4)}
        if what in base:
          rec["speedup"] = round(base[what] / ms, 3)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
