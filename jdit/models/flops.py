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

CLI (the table in docs/benchmarks.md, "FLOPs per image"):
  python -m jdit.models.flops --models DiT-XL/2,DiT-XL/2-local \
      --input_sizes 32,64,128 --xla [--baseline DiT-XL/2] [--markdown]
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
# Other papers' GFLOPs (multiply-adds, as DiT's), (model, input_size) ->
# (GMACs, source). The Qihoo-T2X figures are for its text-to-image models:
# they include a T5 text cross-attention (120 tokens) that our
# class-conditional PT-DiTs do not have. Its DiT/B figures are DiT-B/2's.
PAPER_GMACS = {
    ("DiT-XL/2", 64): (524.6, "DiT Table 3"),
    ("DiT-B/2", 64): (106.1, "Qihoo-T2X Fig. 8"),
    ("DiT-B/2", 128): (650.5, "Qihoo-T2X Fig. 8"),
    ("PT-DiT-B/2", 128): (334.2, "Qihoo-T2X Fig. 8, T2I"),
    ("PT-DiT-L/2", 32): (101.7, "Qihoo-T2X Fig. 2, T2I"),
    ("PT-DiT-L/2", 64): (366.1, "Qihoo-T2X Fig. 2, T2I"),
    ("PT-DiT-L/2", 128): (1423.9, "Qihoo-T2X Fig. 2, T2I"),
    ("PT-DiT-L/2", 256): (5664.9, "Qihoo-T2X Fig. 2, T2I"),
    ("PT-DiT-H/2", 32): (302.1, "Qihoo-T2X Fig. 8, T2I"),
    ("PT-DiT-H/2", 64): (1089.1, "Qihoo-T2X Fig. 8, T2I"),
    ("PT-DiT-H/2", 128): (4236.9, "Qihoo-T2X Fig. 8, T2I"),
    ("PT-DiT-H/2", 256): (16828.3, "Qihoo-T2X Fig. 8, T2I"),
    # 57.6% / 61.6% fewer than DiT-XL/2; lamamba.py says why ours is 0.91x
    # of these (the paper counted d_state 16).
    ("LaMamba-Diff-XL", 32): (118.64 * (1 - 0.576), "LaMamba-Diff abstract"),
    ("LaMamba-Diff-XL", 64): (524.6 * (1 - 0.616), "LaMamba-Diff abstract"),
}
FREQ_DIM = 256  # timestep frequency embedding width (DiT)


def paper_gmacs(name: str, input_size: int) -> float | None:
  """A paper's GFLOPs (multiply-adds) for `name` at `input_size`, if any."""
  if input_size == 32 and name in DIT_PAPER_GMACS:
    return DIT_PAPER_GMACS[name]
  entry = PAPER_GMACS.get((name, input_size))
  return entry[0] if entry else None


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
  feedforward = model.feedforward()
  if not hasattr(feedforward, "macs"):
    raise ValueError(f"no analytic FLOP count for mlp={model.mlp!r}; give "
                     f"it a macs(dim) method (multiply-adds per token)")
  embed = length * p * p * model.in_channels * d
  temb = FREQ_DIM * d + d * d
  block = (6 * d * d  # adaLN modulation, once per image
           + length * feedforward.macs(d))
  mix = sum(mixer_macs(*model.block_mixer(i), model.num_heads, grid, d)
            for i in range(model.depth))
  final = 2 * d * d + length * d * p * p * model.out_channels
  return embed + temb + model.depth * block + mix + final


def text_cross_attention_macs(model, text_tokens: int) -> float:
  """Multiply-adds a PixArt-style text cross-attention would add per image.

  Queries and output projection on the image tokens, keys and values on
  `text_tokens` text tokens, in every block: what the text-to-image models
  of papers such as Qihoo-T2X carry and our class-conditional models lack.
  """
  if not all(hasattr(model, f) for f in ("hidden_size", "depth")):
    raise ValueError(f"text_tokens: a text cross-attention per block is "
                     f"counted for isotropic DiT-family models only; "
                     f"{type(model).__name__} has no single width and depth")
  d, length = model.hidden_size, math.prod(model.grid_shape)
  per_block = (2 * length * d * d + 2 * text_tokens * d * d
               + 2 * length * text_tokens * d)
  return model.depth * per_block


def _build(name, input_size, overrides):
  if input_size is not None:
    overrides = dict(overrides, input_size=input_size)
  return build_model(name, **overrides)


def flops(name: str, input_size=None, **overrides) -> float:
  """Forward FLOPs per image (a multiply-add counts 2), analytic.

  Args:
    name: a registered model name, e.g. "DiT-XL/2" or "DiT-XL/2-local".
    input_size: latent (or pixel) side, e.g. 32 for a 256px image through
      the SD-VAE; None: the model's default (32 for DiT, 16 for
      LightningDiT's f16 latents).
    **overrides: build_model overrides (mixer, mixer_options, ...).
  """
  return 2.0 * model_macs(_build(name, input_size, overrides))


def xla_flops(name: str, input_size=None, **overrides) -> float:
  """FLOPs per image of the compiled forward pass from XLA's cost analysis."""
  model = _build(name, input_size, overrides)
  h, w = model.input_shape[:2]
  x = jax.ShapeDtypeStruct((1, h, w, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
  cost = jax.jit(model.apply).lower(params, x, t, y).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def _table_rows(args):
  """One row per (model, input size): the analytic, XLA and paper counts."""
  sizes = [int(v) for v in args.input_sizes.split(",")]
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  def count(model):
    macs = model_macs(model)
    if args.text_tokens:  # the baseline too: the ratio compares like with like
      macs += text_cross_attention_macs(model, args.text_tokens)
    return 2.0 * macs

  for size in sizes:
    base = count(build_model(args.baseline, input_size=size))
    for name in names:
      model = build_model(name, input_size=size)
      ours = count(model)
      tokens = math.prod(model.grid_shape)
      xla = (xla_flops(name, size) if args.xla and (
          not args.xla_max_tokens or tokens <= args.xla_max_tokens) else None)
      paper = paper_gmacs(name, size)
      yield dict(model=name, px=args.vae_factor * size, tokens=tokens,
                 ours=ours / 1e9,
                 xla=None if xla is None else xla / 1e9,
                 paper=None if paper is None else 2 * paper,
                 ratio=base / ours)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="DiT-S/2,DiT-B/2,DiT-L/2,DiT-XL/2",
                      help="comma-separated registered model names")
  parser.add_argument("--input_sizes", "--input_size", default="32",
                      help="comma-separated latent sides (32 = 256px "
                           "through the SD-VAE)")
  parser.add_argument("--vae_factor", type=int, default=8,
                      help="VAE downsampling, for the px column: 8 (SD-VAE), "
                           "16 (VA-VAE, LightningDiT), 1 (pixel models)")
  parser.add_argument("--xla", action="store_true",
                      help="also compile each model and read XLA's count")
  parser.add_argument("--xla_max_tokens", type=int, default=0,
                      help="skip XLA's count above this many tokens (0: "
                           "never skip)")
  parser.add_argument("--baseline", default="DiT-XL/2",
                      help="model of the last column, baseline/model FLOPs "
                           "at the same input size")
  parser.add_argument("--text_tokens", type=int, default=0,
                      help="add a text cross-attention to this many tokens "
                           "to the analytic count (to compare with "
                           "text-to-image papers; XLA does not see it)")
  parser.add_argument("--markdown", action="store_true",
                      help="print a Markdown table")
  args = parser.parse_args(argv)
  head = ["model", "px", "tokens", "analytic GFLOPs", "XLA GFLOPs",
          "paper GFLOPs", "ours/paper", f"{args.baseline}/model"]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  if args.markdown:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
  else:
    print(f"{head[0]:<22}{head[1]:>6}{head[2]:>8}" + "".join(
        f"{h:>17}" for h in head[3:]))
  for r in _table_rows(args):
    cells = [r["model"], str(r["px"]), str(r["tokens"]), fmt(r["ours"], ".2f"),
             fmt(r["xla"], ".2f"), fmt(r["paper"], ".2f"),
             fmt(r["paper"] and r["ours"] / r["paper"], ".3f"),
             fmt(r["ratio"], ".2f")]
    if args.markdown:
      print("| " + " | ".join(cells) + " |")
    else:
      print(f"{cells[0]:<22}{cells[1]:>6}{cells[2]:>8}" + "".join(
          f"{c:>17}" for c in cells[3:]))


if __name__ == "__main__":
  main()
