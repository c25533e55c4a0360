"""The mamba mixer's scan directions and convs against explicit references.

scan_orders.split/merge_directions against numpy permutations of the grid;
the mixer (1, 2 and 4 directions, causal 1D and depthwise 2D convs) against
a straightforward reference: one selective-scan reference call per
direction over its explicitly permuted tokens, outputs un-permuted and
summed; its FLOP count term by term.
"""
import itertools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdit.models import scan_orders
from jdit.models.mixers import get_mixer
from pallas_kernels.selective_scan import selective_scan_reference

DIM = 16
# The SS2D setting LaMamba-Diff uses (lamamba.MAMBA_OPTIONS).
SS2D = dict(state=1, d_conv=3, scan_order="zigzag", bidirectional=True,
            cross_scan=True, conv="depthwise2d", out_norm=True)


def _in_order(index_grid, order):
  """Row-major token indices of an index grid, in `order`."""
  rows = index_grid.reshape(-1, index_grid.shape[-1]).copy()
  if order == "zigzag":
    rows[1::2] = rows[1::2, ::-1]
  return rows.reshape(-1)


def _permutations(grid, order, cross, bidirectional):
  """Token indices of every direction, in the mixer's direction order."""
  index = np.arange(math.prod(grid)).reshape(grid)
  perms = [_in_order(index, order)]
  if cross:  # the columns: rows of the grid with its last two axes swapped
    perms.append(_in_order(np.swapaxes(index, -1, -2), order))
  if bidirectional:
    perms += [p[::-1] for p in perms]
  return perms


def test_column_snake_example():
  # (2, 3) grid: rows snake 0 1 2 | 5 4 3; columns snake 0 3 | 4 1 | 2 5.
  perms = _permutations((2, 3), "zigzag", True, False)
  np.testing.assert_array_equal(perms[0], [0, 1, 2, 5, 4, 3])
  np.testing.assert_array_equal(perms[1], [0, 3, 4, 1, 2, 5])
  x = np.arange(6.0)[None, :, None]
  got = scan_orders.split_directions(x, (2, 3), "zigzag", cross=True,
                                     bidirectional=False)
  np.testing.assert_array_equal(got[0, :, 1, 0], perms[1])


@pytest.mark.parametrize("grid,order,cross,bidirectional", [
    ((4, 6), order, cross, bidi) for order, cross, bidi in itertools.product(
        scan_orders.SCAN_ORDERS, (False, True), (False, True))
] + [((2, 3, 4), "zigzag", True, True), ((5, 3), "zigzag", True, True)])
def test_split_and_merge_are_the_permutations(grid, order, cross,
                                              bidirectional):
  rng = np.random.default_rng(0)
  length = math.prod(grid)
  perms = _permutations(grid, order, cross, bidirectional)
  kw = dict(cross=cross, bidirectional=bidirectional)
  x = rng.standard_normal((2, length, 3)).astype(np.float32)
  got = scan_orders.split_directions(x, grid, order, **kw)
  np.testing.assert_array_equal(got, np.stack([x[:, p] for p in perms], 2))
  y = rng.standard_normal((2, length, len(perms), 3)).astype(np.float32)
  want = sum(y[:, np.argsort(p), k] for k, p in enumerate(perms))
  np.testing.assert_allclose(
      scan_orders.merge_directions(y, grid, order, **kw), want, atol=1e-6)


def _conv2d_same(x, grid, kernel):
  """Depthwise 'SAME' 2D conv of (B, L, C) tokens, per frame of the grid."""
  h, w = grid[-2:]
  taps = kernel.shape[0]
  r = (taps - 1) // 2
  frames = np.asarray(x).reshape(-1, h, w, x.shape[-1])
  padded = np.pad(frames, ((0, 0), (r, taps - 1 - r), (r, taps - 1 - r),
                           (0, 0)))
  out = np.zeros_like(frames)
  for i in range(taps):
    for j in range(taps):
      out += kernel[i, j, 0] * padded[:, i:i + h, j:j + w]
  return out.reshape(x.shape)


def _causal_conv1d(x, kernel, bias):
  """out_t = bias + sum_j kernel[j] x_{t - taps + 1 + j}, zeros before 0."""
  taps, length = kernel.shape[0], x.shape[1]
  padded = np.pad(np.asarray(x), ((0, 0), (taps - 1, 0), (0, 0)))
  return bias + sum(kernel[j] * padded[:, j:j + length] for j in range(taps))


@jax.jit
def _scan(u, delta, a, b, c, d, bias):
  return selective_scan_reference(u, delta, a, b, c, D=d, delta_bias=bias,
                                  delta_softplus=True)


def _reference(params, x, grid, mixer):
  """The mamba mixer written direction by direction, without stacking."""
  p = jax.tree.map(np.asarray, nn.unbox(params)["params"])
  u, z = np.split(np.asarray(x) @ p["in_proj"]["kernel"], 2, axis=-1)
  perms = _permutations(grid, mixer.scan_order, mixer.cross_scan,
                        mixer.bidirectional)
  if mixer.conv == "depthwise2d":
    u = jax.nn.silu(_conv2d_same(u, grid, p["conv2d"]["kernel"]))
  rank = p["dt_proj"].shape[1]
  y = 0
  for k, perm in enumerate(perms):
    uk = np.asarray(u)[:, perm]
    if mixer.conv == "causal1d":
      uk = jax.nn.silu(_causal_conv1d(uk, p["conv1d"]["kernel"][:, k],
                                      p["conv1d"]["bias"][k]))
    dt, b, c = np.split(np.asarray(uk) @ p["x_proj"][k],
                        [rank, rank + mixer.state], axis=-1)
    yk = _scan(uk, dt @ p["dt_proj"][k], -np.exp(p["A_log"][k]),
               b[:, :, None], c[:, :, None], p["D"][k], p["dt_bias"][k])
    y = y + np.asarray(yk)[:, np.argsort(perm)]
  y = y / len(perms)
  if mixer.out_norm:
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    y = ((y - mu) / np.sqrt(var + 1e-5) * p["out_norm"]["scale"]
         + p["out_norm"]["bias"])
  return (y * jax.nn.silu(z)) @ p["out_proj"]["kernel"]


def _build(grid, impl="reference", batch=2, **options):
  """The mixer, an input and params with every value random (jitted init:
  eager init compiles each op on its own, seconds on a busy CPU)."""
  mixer = get_mixer("mamba")(num_heads=1, impl=impl, **options)
  x = jax.random.normal(jax.random.PRNGKey(0),
                        (batch, math.prod(grid), DIM))
  params = nn.unbox(jax.jit(mixer.init, static_argnames="grid_shape")(
      jax.random.PRNGKey(1), x, grid_shape=grid))
  rng = np.random.default_rng(3)  # also moves the constant-initialised ones
  params = jax.tree.map(
      lambda l: l + 0.1 * rng.standard_normal(l.shape).astype(l.dtype),
      params)
  return mixer, x, params


def _apply(mixer, params, x, grid):
  return jax.jit(mixer.apply, static_argnames="grid_shape")(
      params, x, grid_shape=grid)


@pytest.mark.parametrize("grid,options", [
    ((4, 6), dict(state=4)),  # DiM: bidirectional raster, causal conv1d
    ((4, 6), dict(state=4, scan_order="zigzag", bidirectional=False)),
    ((4, 6), SS2D),
    ((5, 3), dict(SS2D, scan_order="raster")),  # VMamba's raster cross scan
    ((4, 6), dict(state=2, cross_scan=True, conv="causal1d", d_conv=2)),
    ((2, 4, 3), SS2D),  # frames: per-frame conv and columns
])
def test_mixer_matches_per_direction_reference(grid, options):
  mixer, x, params = _build(grid, **options)
  got = _apply(mixer, params, x, grid)
  np.testing.assert_allclose(got, _reference(params, x, grid, mixer),
                             atol=2e-5, rtol=2e-5)


def test_four_directions_through_the_pallas_kernel():
  # One selective_scan call with a group of B/C per direction, in the
  # kernel (interpret mode on CPU), as the reference path computes it.
  grid = (4, 4)
  ref, x, params = _build(grid, batch=1, **SS2D)
  pallas = get_mixer("mamba")(num_heads=1, impl="pallas", **SS2D)
  np.testing.assert_allclose(_apply(pallas, params, x, grid),
                             _apply(ref, params, x, grid),
                             atol=1e-5, rtol=1e-5)


def test_ss2d_gradients_finite_and_reach_every_parameter():
  grid = (4, 6)
  mixer, x, params = _build(grid, **SS2D)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(
      mixer.apply(p, x, grid_shape=grid) ** 2)))(params)
  chex.assert_tree_all_finite(grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).sum()) > 0, jax.tree_util.keystr(path)
  assert grads["params"]["x_proj"].shape[0] == 4  # one per direction


def test_macs_term_by_term():
  grid, dim = (4, 6), 32
  length, inner, rank = 24, 64, 2  # expand 2; dt_rank ceil(32 / 16)
  proj = length * dim * 3 * inner  # in_proj (x and z) and out_proj
  # Per direction and channel: x_proj (rank + 2N), dt_proj (rank), scan 3N.
  ss2d = get_mixer("mamba")(num_heads=1, **SS2D)
  per_dir = rank + 2 + rank + 3
  assert ss2d.macs(grid, dim) == proj + length * inner * (9 + 4 * per_dir)
  dim_like = get_mixer("mamba")(num_heads=1, state=16, d_conv=4)
  per_dir = rank + 32 + rank + 48
  assert dim_like.macs(grid, dim) == proj + length * inner * (
      2 * 4 + 2 * per_dir)


@pytest.mark.parametrize("options,match", [
    (dict(conv="depthwise"), r"mamba conv must be one of \('causal1d', "
                             r"'depthwise2d'\)"),
    (dict(scan_order="hilbert"), "scan_order must be one of"),
    (dict(dt_rank=-1), "dt_rank must be >= 0"),
    (dict(d_conv=0), "d_conv must be >= 1"),
])
def test_bad_options_name_the_option(options, match):
  mixer = get_mixer("mamba")(num_heads=1, **options)
  x = jnp.zeros((1, 24, DIM))
  with pytest.raises(ValueError, match=match):
    mixer.init(jax.random.PRNGKey(0), x, grid_shape=(4, 6))


@pytest.mark.parametrize("options", [dict(cross_scan=True),
                                     dict(conv="depthwise2d")])
def test_grid_options_need_two_axes(options):
  mixer = get_mixer("mamba")(num_heads=1, **options)
  with pytest.raises(ValueError, match="at least 2 axes"):
    mixer.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, DIM)),
               grid_shape=(8,))


def test_ss2d_sharded_matches_unsharded():
  # Tensor parallelism splits the stacked directions' channels (4 | 4
  # groups: whole directions per device) and the batch over data.
  rules = (("act_batch", "data"), ("act_length", None), ("act_embed", None),
           ("embed", None), ("mlp", "tensor"))
  grid = (4, 4)
  mixer, x, params = _build(grid, batch=4, **SS2D)
  expected = _apply(mixer, params, x, grid)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
  boxed = jax.eval_shape(lambda k, x: mixer.init(k, x, grid_shape=grid),
                         jax.random.PRNGKey(1), x)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                          rules)
  params = jax.device_put(params, shardings)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  with mesh, nn.logical_axis_rules(rules):
    out = jax.jit(lambda p, x: mixer.apply(p, x, grid_shape=grid))(params,
                                                                    xs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected),
                             atol=2e-5, rtol=2e-5)
