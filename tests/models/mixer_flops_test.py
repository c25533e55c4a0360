"""Each mixer's analytic FLOP count vs XLA's cost analysis of that mixer alone.

The whole-model check (families_test.test_analytic_matches_xla) dilutes a
mixer's count with the MLP and embeddings; here every registered mixer is
compiled on its own. XLA counts every op, so it sits above the analytic
count (matmuls only) by the elementwise work: softmax, biases, norms. At
width 256 on an 8x8 grid that is under 1% for the attention-like mixers;
XLA_RTOL allows 2%. Two mixers run a CPU reference whose XLA count differs
from the work the accelerator kernel does, and the expectation says how:
  local  the reference computes the full masked score matrix, so XLA sees
         dense attention; the window's key count is checked exactly against
         a brute-force mask instead.
  mamba  the reference scan is a lax.scan, whose body XLA counts once; its
         elementwise gating (softplus, SiLU, D skip) is ~5% at this size.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import models  # noqa: F401  (registers every mixer)
from jdit.models.flops import mixer_macs
from jdit.models.mixers import MIXERS, get_mixer

GRID = (8, 8)
DIM, HEADS = 256, 4
OPTIONS = {
    "local": {"window": 2},
    "window": {"window": 4, "shift": 2},
    "proxy": {"proxy_grid": 4},
    "kv_compress": {"ratio": 2},
    "mamba": {"state": 4},
}
XLA_RTOL = {"mamba": 0.06}
XLA_RTOL_DEFAULT = 0.02


def _xla_flops(name, options):
  mixer = get_mixer(name)(num_heads=HEADS, **options)
  x = jax.ShapeDtypeStruct((1, math.prod(GRID), DIM), jnp.float32)
  params = jax.eval_shape(
      lambda x: mixer.init(jax.random.PRNGKey(0), x, grid_shape=GRID), x)
  apply = jax.jit(lambda p, x: mixer.apply(p, x, grid_shape=GRID))
  cost = apply.lower(params, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def _expected_xla(name, options):
  """The FLOPs XLA should see: the analytic count, adjusted as stated."""
  if name == "local":  # the reference attends densely under a mask
    return 2.0 * mixer_macs("attention", {}, HEADS, GRID, DIM)
  flops = 2.0 * mixer_macs(name, options, HEADS, GRID, DIM)
  if name == "mamba":  # XLA counts one of the L scan steps per direction
    mixer = get_mixer("mamba")(num_heads=HEADS, **options)
    length, inner = math.prod(GRID), mixer.expand * DIM
    flops -= (2 * mixer.num_directions * 3 * mixer.state * inner
              * (length - 1))
  return flops


# VMamba's SS2D as LaMamba-Diff uses it: 4 directions, a 2D conv, out norm.
SS2D = {"state": 1, "d_conv": 3, "scan_order": "zigzag", "cross_scan": True,
        "conv": "depthwise2d", "out_norm": True}


@pytest.mark.parametrize("name,options", [
    (name, OPTIONS.get(name, {})) for name in sorted(MIXERS)] + [
        ("mamba", SS2D)])
def test_mixer_analytic_count_matches_xla(name, options):
  expected = _expected_xla(name, options)
  xla = _xla_flops(name, options)
  # XLA adds elementwise work, never less than the matmuls.
  assert expected * 0.999 <= xla <= expected * (
      1 + XLA_RTOL.get(name, XLA_RTOL_DEFAULT)), (name, expected, xla)


@pytest.mark.parametrize("grid,window,shape", [((8, 8), 2, "circle"),
                                               ((8, 8), 3, "square"),
                                               ((6, 10), 4, "circle"),
                                               ((3, 4, 5), 2, "circle")])
def test_local_macs_count_the_window_pairs(grid, window, shape):
  # q.k and a.v cost 2 * dim multiply-adds per (query, key) pair in the
  # window, the projections 4 * length * dim^2.
  pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"),
                 -1).reshape(-1, len(grid))
  d = pos[:, None] - pos[None]
  inside = ((d ** 2).sum(-1) <= window ** 2 if shape == "circle"
            else np.abs(d).max(-1) <= window)
  length = math.prod(grid)
  want = 4 * length * DIM * DIM + 2 * int(inside.sum()) * DIM
  assert mixer_macs("local", {"window": window, "shape": shape}, HEADS, grid,
                    DIM) == want
