"""Forward FLOPs per image: an analytic count and XLA's cost analysis.

`flops(name, input_size)` counts the matmul multiply-adds of one forward pass
of a named model (the DiT paper's convention for its "Gflops", which are
multiply-adds, see facebookresearch/DiT issue #14) and returns 2x that, true
FLOPs. Elementwise work (norms, softmax, activations, the scan's exp) is not
counted. Token mixers other than "attention" supply their own count through
a `macs(grid_shape, dim)` method.

`xla_flops(name, input_size)` compiles the model's forward pass on the host
and reads XLA's cost analysis, which counts every op (so it sits above the
analytic count by the elementwise work) and counts a loop body once (so it
undercounts lax.scan, e.g. the reference selective scan).

CLI: python -m jdit.models.flops --models DiT-XL/2,DiT-XL/2-local [--xla]
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from jdit.models import mixers
from jdit.models.registry import build_model

# The DiT paper's Gflops (multiply-adds) at 256px (input_size 32), Table 4.
DIT_PAPER_GMACS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
FREQ_DIM = 256  # timestep frequency embedding width (DiT)


def mixer_macs(name: str, options, num_heads: int, grid_shape, dim: int):
  """Multiply-adds of one token mixer over one image's tokens."""
  cls = mixers.get_mixer(name)
  mixer = cls(num_heads=num_heads, **dict(options or {}))
  if hasattr(mixer, "macs"):
    return mixer.macs(tuple(grid_shape), dim)
  if name == "attention":
    length = math.prod(grid_shape)
    return 4 * length * dim * dim + 2 * length * length * dim
  raise ValueError(f"mixer {name!r} has no analytic FLOP count; give it a "
                   f"macs(grid_shape, dim) method")


def model_macs(model) -> float:
  """Multiply-adds of one forward pass of a DiT-family module, per image.

  Backbones that are not isotropic DiTs (e.g. LaMamba-Diff's U-Net) count
  their own with a `macs()` method.
  """
  if hasattr(model, "macs"):
    return float(model.macs())
  d, p = model.hidden_size, model.patch_size
  grid = model.grid_shape
  length = math.prod(grid)
  if model.mlp != "dense":
    raise ValueError(f"no analytic FLOP count for mlp={model.mlp!r}")
  embed = length * p * p * model.in_channels * d
  temb = FREQ_DIM * d + d * d
  block = (6 * d * d  # adaLN modulation, once per image
           + mixer_macs(model.mixer, model.mixer_options, model.num_heads,
                        grid, d)
           + 2 * length * d * int(d * model.mlp_ratio))
  final = 2 * d * d + length * d * p * p * model.out_channels
  return embed + temb + model.depth * block + final


def flops(name: str, input_size=32, **overrides) -> float:
  """Forward FLOPs per image (a multiply-add counts 2), analytic.

  Args:
    name: a registered model name, e.g. "DiT-XL/2" or "DiT-XL/2-local".
    input_size: latent (or pixel) side, 32 for a 256px image through the
      SD-VAE.
    **overrides: build_model overrides (mixer, mixer_options, ...).
  """
  return 2.0 * model_macs(build_model(name, input_size=input_size,
                                      **overrides))


def xla_flops(name: str, input_size=32, **overrides) -> float:
  """FLOPs per image of the compiled forward pass from XLA's cost analysis."""
  model = build_model(name, input_size=input_size, **overrides)
  h, w = ((input_size, input_size) if isinstance(input_size, int)
          else tuple(input_size))
  x = jax.ShapeDtypeStruct((1, h, w, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
  cost = jax.jit(model.apply).lower(params, x, t, y).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="DiT-S/2,DiT-B/2,DiT-L/2,DiT-XL/2",
                      help="comma-separated registered model names")
  parser.add_argument("--input_size", type=int, default=32,
                      help="latent side (32 = 256px through the SD-VAE)")
  parser.add_argument("--xla", action="store_true",
                      help="also compile each model and read XLA's count")
  args = parser.parse_args(argv)
  print(f"{'model':<22}{'analytic GFLOPs':>17}{'XLA GFLOPs':>12}"
        f"{'paper GFLOPs':>14}{'ratio':>7}")
  for name in args.models.split(","):
    name = name.strip()
    ours = flops(name, args.input_size) / 1e9
    xla = (f"{xla_flops(name, args.input_size) / 1e9:12.2f}" if args.xla
           else f"{'-':>12}")
    paper = DIT_PAPER_GMACS.get(name) if args.input_size == 32 else None
    ref = (f"{2 * paper:14.2f}{ours / (2 * paper):7.3f}" if paper
           else f"{'-':>14}{'':>7}")
    print(f"{name:<22}{ours:17.2f}{xla}{ref}")


if __name__ == "__main__":
  main()
