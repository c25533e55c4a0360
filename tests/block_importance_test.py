"""Block Influence (ShortGPT): scores against hand-computed cosines, the
keep rule, and the CLI's pruned checkpoint."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import block_importance, checkpoint, depth_prune, diffusion, sampling
from tests.conftest import random_params


class _Map(nn.Module):
  """A residual block that applies a fixed map to every token."""
  residual_block = True
  kind: str

  def __call__(self, x):
    if self.kind == "scale":  # same direction: cos 1
      return 3.0 * x
    if self.kind == "negate":  # opposite: cos -1
      return -x
    # Zero the second half of the width: cos = |a1| / |a|.
    half = x.shape[-1] // 2
    return jnp.concatenate([x[..., :half], jnp.zeros_like(x[..., half:])],
                           -1)


class _Toy(nn.Module):
  kinds: tuple

  @nn.compact
  def __call__(self, x, t, y):
    del t, y
    for i, kind in enumerate(self.kinds):
      x = _Map(kind, name=f"blocks_{i}")(x)
    return x


def test_scores_equal_hand_computed_cosines():
  objective = diffusion.create("flow", None, learn_sigma=False)
  model = _Toy(("scale", "negate", "half"))
  x0 = np.random.default_rng(0).normal(size=(4, 3, 3, 8)).astype(np.float32)
  batches = [{"x": x0, "y": np.zeros(4, np.int32)}]
  scores = block_importance.block_influence(
      model, {}, objective, batches)
  # Block 2's input is the noised x0 (times 3, negated: same direction up to
  # sign), whatever the timestep; recompute it as the objective does.
  key = jax.random.fold_in(jax.random.key(0), 0)
  seen = []
  objective.loss(lambda x, t, y: seen.append(x) or x, jnp.asarray(x0), key,
                 jnp.zeros(4, jnp.int32))
  a = np.asarray(seen[0], np.float64)
  cos = np.linalg.norm(a[..., :4], axis=-1) / np.linalg.norm(a, axis=-1)
  np.testing.assert_allclose(scores,
                             [0.0, 2.0, 1.0 - cos.mean()], atol=1e-5)
  assert block_importance.keep_most_influential(scores, 2) == [1, 2]
  with pytest.raises(ValueError, match=r"--keep must be in \[1, 3\]"):
    block_importance.keep_most_influential(scores, 4)


def test_cli_prunes_the_least_influential_block(tiny_config, tmp_path,
                                                 capsys):
  c = tiny_config
  c.model.depth = 3
  model, _ = sampling.model_from_config(c)
  params = jax.tree.map(np.array, random_params(model, seed=2, scale=0.2))
  # adaLN-Zero: zero modulation makes block 1 the identity (BI exactly 0).
  for leaf in params["blocks_1"]["adaLN_modulation"].values():
    leaf[...] = 0
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "pruned")
  checkpoint.save_for_sampling(ckpt, params, c)
  block_importance.main(["--checkpoint", ckpt, "--num_batches", "2",
                         "--batch_size", "8", "--keep", "2", "--out", out])
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  scores = report["block_influence"]
  assert scores[1] == pytest.approx(0.0, abs=1e-6)
  assert min(scores[0], scores[2]) > 1e-3
  assert report["kept"] == [0, 2]
  pruned, config = checkpoint.load_for_sampling(out)
  assert config.model.depth == 2
  expected = depth_prune.prune_blocks(params, [0, 2], 3)
  jax.tree.map(np.testing.assert_array_equal, pruned, expected)
  with pytest.raises(SystemExit):
    block_importance.main(["--checkpoint", ckpt, "--keep", "2"])
  with pytest.raises(ValueError, match=r"--keep must be in \[1, 3\]"):
    block_importance.main(["--checkpoint", ckpt, "--keep", "5", "--out",
                           str(tmp_path / "other")])
