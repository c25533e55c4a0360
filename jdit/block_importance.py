"""Block Influence (ShortGPT): a one-shot depth-pruning baseline.

ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are
More Redundant Than You Expect") scores each residual block by how much it
turns its input,

    BI_i = 1 - E[cos(x_in, x_out)]

the cosine taken per token over the width, averaged over tokens, examples
and, for a diffusion model, the noised inputs the objective trains on
(random timesteps, the checkpoint's own data). Blocks with the lowest BI are
removed first. TinyFusion (jdit.depth_prune) compares its learned pruning
against this score; here it is a calibration pass with no training:

  python -m jdit.block_importance --checkpoint D [--num_batches 8] \\
      [--keep 14 --out PRUNED]

prints BI per block and, with --keep, writes the checkpoint of the `keep`
highest-scoring blocks (the original weights, renumbered) that sample.py and
config.distill.init_from read, as depth_prune's own CLI does.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jdit import checkpoint, data, depth_prune, sampling
from jdit.models import block_hooks


def block_influence(model, params, objective, batches, seed: int = 0
                    ) -> np.ndarray:
  """BI of every residual block, averaged over `batches` of model inputs
  ({"x", "y"} as the input pipeline gives them), each noised as the
  objective does in training."""

  @jax.jit
  def cosines(x0, y, key):
    sums = []

    def block_fn(i, call, x_in):
      del i
      out = call()
      a, b = x_in.astype(jnp.float32), out.astype(jnp.float32)
      cos = jnp.sum(a * b, -1) / jnp.maximum(
          jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
      sums.append(jnp.mean(cos))
      return out

    def model_fn(x_t, t, y):
      return block_hooks.apply_with_block_hook(
          model, {"params": params}, block_fn, x_t, t, y)

    objective.loss(model_fn, x0, key, y)
    return jnp.stack(sums)

  total, count = 0.0, 0
  for k, batch in enumerate(batches):
    total = total + np.asarray(cosines(jnp.asarray(batch["x"]),
                                       jnp.asarray(batch["y"]),
                                       jax.random.fold_in(
                                           jax.random.key(seed), k)))
    count += 1
  if not count:
    raise ValueError("block_influence needs at least one batch")
  return 1.0 - total / count


def keep_most_influential(scores, keep: int) -> list[int]:
  """Indices (ascending) of the `keep` blocks with the highest BI."""
  if not 1 <= keep <= len(scores):
    raise ValueError(f"--keep must be in [1, {len(scores)}] (the model's "
                     f"blocks), got {keep}")
  return sorted(int(i) for i in np.argsort(-np.asarray(scores),
                                           kind="stable")[:keep])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m jdit.block_importance",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="any checkpoint sample.py reads")
  p.add_argument("--data_dir", default="",
                 help="the dataset's data_dir; '' = the checkpoint config's")
  p.add_argument("--num_batches", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--keep", type=int, default=0,
                 help="> 0: write the checkpoint of the keep best blocks")
  p.add_argument("--out", default="", help="with --keep: new directory")
  args = p.parse_args(argv)
  if args.keep and not args.out:
    p.error("--keep needs --out")
  if args.num_batches < 1 or args.batch_size < 1:
    p.error("--num_batches and --batch_size must be >= 1")
  params, config = checkpoint.load_for_sampling(args.checkpoint)
  model, objective = sampling.model_from_config(config)
  depth_prune.check_prunable(model)
  if args.keep:  # a bad --keep fails before the calibration pass
    keep_most_influential(np.zeros(model.depth), args.keep)
  data_dir = args.data_dir or config.data.data_dir
  spec = data.get_spec(config.data.name, data_dir)
  if spec.buckets:
    raise ValueError("block_importance reads one input shape; point "
                     "--data_dir at one bucket's directory (<h>x<w>/)")
  pipeline = data.make_pipeline(
      data.load_source(config.data.name, config.data.split, data_dir), spec,
      global_batch_size=args.batch_size, seed=args.seed)
  batches = (pipeline.load(k) for k in range(args.num_batches))
  scores = block_influence(model, params, objective, batches, args.seed)
  report = {"block_influence": [round(float(s), 6) for s in scores]}
  if args.keep:
    kept = keep_most_influential(scores, args.keep)
    depth_prune.write_pruned(params, config, kept, model.depth, args.out)
    report.update(kept=kept, out=args.out)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
