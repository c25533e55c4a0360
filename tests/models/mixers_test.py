"""Registry-wide token-mixer tests: every registered mixer is tested here.

The parameterised tests run over MIXERS.keys(), so a newly registered mixer
gets shape, gradient, jit, sharding and bf16 checks without a line of test
code; options for the tiny 8x8 grid go in TEST_OPTIONS when the defaults do
not fit. Per-mixer semantic and bad-input tests follow.
"""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdit import models
from jdit.models import local_mixers, scan_orders
from jdit.models.mixers import MIXERS, get_mixer

GRID = (8, 8)
DIM, HEADS, BATCH = 32, 4, 4
# Options sized for the 8x8 test grid (defaults otherwise).
TEST_OPTIONS = {
    "local": {"window": 2},
    "window": {"window": 4, "shift": 2},
    "proxy": {"proxy_window": 2, "window": 4, "shift": 2},
    "kv_compress": {"ratio": 2},
    "mamba": {"state": 4},
}
RULES = (("act_batch", "data"), ("act_length", None), ("act_embed", None),
         ("embed", None), ("heads", "tensor"), ("kv", None),
         ("mlp", "tensor"))


def _make(name, dtype=jnp.float32, **options):
  opts = {**TEST_OPTIONS.get(name, {}), **options}
  return get_mixer(name)(num_heads=HEADS, dtype=dtype, **opts)


def _x(grid=GRID, batch=BATCH, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed),
                           (batch, math.prod(grid), DIM))


def _init(mixer, x, grid=GRID):
  return mixer.init(jax.random.PRNGKey(1), x, grid_shape=grid)


def _apply(mixer, params, x, grid=GRID):
  return mixer.apply(params, x, grid_shape=grid)


NAMES = sorted(MIXERS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grid", [GRID, (2, 4, 4)])
def test_output_shape(name, grid):
  small = {"window": 2, "shift": 1} if len(grid) == 3 else {}
  mixer = _make(name, **(small if name in ("window", "proxy") else {}))
  x = _x(grid, batch=2)
  # Jitted: op-by-op dispatch is several times slower on CPU.
  params = jax.jit(lambda x: _init(mixer, x, grid))(x)
  out = jax.jit(lambda p, x: _apply(mixer, p, x, grid))(params, x)
  chex.assert_shape(out, x.shape)
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite(name):
  mixer = _make(name)
  x = _x(batch=2)
  params = jax.jit(lambda x: _init(mixer, x))(x)

  def loss(p, x):
    return jnp.sum(_apply(mixer, p, x) ** 2)

  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  chex.assert_tree_all_finite((gp, gx))
  assert float(jnp.abs(gx).sum()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_jit_traces_once(name):
  mixer = _make(name)
  x = _x(batch=2)
  params = _init(mixer, x)
  traces = []

  @jax.jit
  def f(p, x):
    traces.append(1)
    return _apply(mixer, p, x)

  a = f(params, x)
  b = f(params, x + 1.0)
  jax.block_until_ready((a, b))
  assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_sharded_matches_unsharded(name, mesh_shape):
  mixer = _make(name)
  x = _x(batch=8)
  boxed = _init(mixer, x)
  params = nn.unbox(boxed)
  expected = _apply(mixer, params, x)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape),
              ("data", "tensor"))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                          RULES)
  if mesh_shape[1] > 1:  # heads / inner channels carry logical names
    specs = jax.tree.leaves(shardings, is_leaf=lambda s: hasattr(s, "spec"))
    assert any("tensor" in str(s.spec) for s in specs)
  params = jax.device_put(params, shardings)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  with mesh, nn.logical_axis_rules(RULES):
    out = jax.jit(lambda p, x: _apply(mixer, p, x))(params, xs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected),
                             atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_forward(name):
  mixer = _make(name, dtype=jnp.bfloat16)
  x = _x(batch=2).astype(jnp.bfloat16)
  out = _apply(mixer, _init(mixer, x), x)
  assert out.dtype == jnp.bfloat16
  chex.assert_shape(out, x.shape)
  chex.assert_tree_all_finite(out.astype(jnp.float32))


@pytest.mark.parametrize("name", NAMES)
def test_in_dit_backbone(name):
  model = models.build_model(
      "DiT-S/2", depth=1, hidden_size=DIM, num_heads=HEADS, input_size=16,
      num_classes=10, mixer=name, mixer_options=TEST_OPTIONS.get(name))
  x = jnp.ones((2, 16, 16, 4))
  t, y = jnp.array([1.0, 500.0]), jnp.array([0, 3])
  params = model.init(jax.random.PRNGKey(0), x, t, y)
  out = model.apply(params, x, t, y)
  chex.assert_shape(out, (2, 16, 16, 8))
  chex.assert_tree_all_finite(out)


# ---------------------------------------------------------------- semantics


def _full_attention(params, x):
  return get_mixer("attention")(num_heads=HEADS).apply(params, x,
                                                       grid_shape=GRID)


def test_window_whole_grid_is_full_attention():
  x = _x()
  mixer = _make("window", window=GRID, shift=0)
  params = _init(mixer, x)
  np.testing.assert_allclose(_apply(mixer, params, x),
                             _full_attention(params, x), atol=1e-5)


def test_local_window_covering_grid_is_full_attention():
  x = _x()
  for shape in ("circle", "square"):
    mixer = _make("local", window=12, shape=shape)
    params = _init(mixer, x)
    np.testing.assert_allclose(_apply(mixer, params, x),
                               _full_attention(params, x), atol=1e-5)


def test_kv_compress_ratio_one_is_full_attention():
  x = _x()
  mixer = _make("kv_compress", ratio=1)
  params = _init(mixer, x)
  np.testing.assert_allclose(_apply(mixer, params, x),
                             _full_attention(params, x), atol=1e-5)


def test_kv_compress_pools_keys_and_values():
  # At init the conv is the 2x2 average, then a unit LayerNorm.
  x = _x(batch=2)
  mixer = _make("kv_compress", ratio=2)
  params = nn.unbox(_init(mixer, x))
  p = params["params"]
  qkv = jnp.einsum("bld,dthk->blthk", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def pool(t):
    t = t.reshape(2, 4, 2, 4, 2, DIM).mean(axis=(2, 4)).reshape(2, 16, DIM)
    mu = t.mean(-1, keepdims=True)
    t = (t - mu) / jnp.sqrt(t.var(-1, keepdims=True) + 1e-6)
    return t.reshape(2, 16, HEADS, DIM // HEADS)

  o = jax.nn.dot_product_attention(q, pool(k), pool(v))
  want = jnp.einsum("blhk,hkd->bld", o, p["proj"]["kernel"]) + p["proj"]["bias"]
  np.testing.assert_allclose(_apply(mixer, params, x), want, atol=1e-4)


@pytest.mark.parametrize("grid,window,shift", [((8, 8), (4, 4), (2, 2)),
                                               ((8, 4), (4, 2), (1, 1)),
                                               ((4, 4, 4), (2, 4, 2),
                                                (1, 0, 1))])
def test_shifted_windows_match_explicit_mask(grid, window, shift):
  # Swin's rolled-and-masked windows equal windows offset by -shift on the
  # un-rolled grid, with the wrapped border tokens in a window of their own.
  l = math.prod(grid)
  q, k, v = jax.random.normal(jax.random.PRNGKey(3), (3, 2, l, 2, 8))
  got = local_mixers.window_attention(q, k, v, grid, window, shift)
  pos = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"),
                 -1).reshape(l, len(grid))
  wid = (pos - np.asarray(shift)) // np.asarray(window)
  mask = np.all(wid[:, None] == wid[None], -1)
  want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  np.testing.assert_allclose(got, want, atol=1e-5)


def _swap_directions(params):
  # Per-direction parameters are stacked on axis 0 (the conv taps on 1).
  p = dict(nn.unbox(params)["params"])
  for name in ("x_proj", "dt_proj", "dt_bias", "A_log", "D"):
    p[name] = p[name][::-1]
  p["conv1d"] = {"kernel": p["conv1d"]["kernel"][:, ::-1],
                 "bias": p["conv1d"]["bias"][::-1]}
  return {"params": p}


def test_mamba_bidirectional_is_reverse_symmetric():
  # Reversing a raster sequence and swapping the two directions' parameters
  # must reverse the output: the backward scan is the forward scan of the
  # reversed tokens.
  x = _x(batch=2)
  mixer = _make("mamba")
  params = _init(mixer, x)
  out = _apply(mixer, params, x)
  flipped = _apply(mixer, _swap_directions(params), x[:, ::-1])
  np.testing.assert_allclose(flipped[:, ::-1], out, atol=1e-5)


@pytest.mark.parametrize("order", ["raster", "zigzag"])
def test_mamba_forward_only_is_causal_in_scan_order(order):
  x = _x(batch=1)
  mixer = _make("mamba", bidirectional=False, scan_order=order)
  params = _init(mixer, x)
  perm = scan_orders.scan_permutation(GRID, order)
  i = 20  # position in scan order
  jac = jax.grad(lambda x: _apply(mixer, params, x)[0, perm[i]].sum())(x)
  dep = np.abs(np.asarray(jac[0])).sum(-1)[perm]
  assert np.all(dep[i + 1:] == 0) and np.all(dep[:i + 1] > 0)


def test_zigzag_order_snakes_rows():
  perm = scan_orders.scan_permutation((3, 4), "zigzag")
  np.testing.assert_array_equal(perm, [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11])


def test_linear_matches_explicit_formula():
  x = _x(batch=2)
  mixer = _make("linear", conv_kernel=0, feature_map="elu")
  params = nn.unbox(_init(mixer, x))
  p = params["params"]
  qkv = jnp.einsum("bld,dthk->blthk", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
  q, k, v = (jax.nn.elu(qkv[:, :, 0]) + 1, jax.nn.elu(qkv[:, :, 1]) + 1,
             qkv[:, :, 2])
  a = jnp.einsum("bihk,bjhk->bhij", q, k)
  o = jnp.einsum("bhij,bjhk->bihk", a / (a.sum(-1, keepdims=True) + 1e-6), v)
  want = jnp.einsum("blhk,hkd->bld", o, p["proj"]["kernel"]) + p["proj"]["bias"]
  np.testing.assert_allclose(_apply(mixer, params, x), want, atol=1e-4)


def test_linear_conv_term_starts_at_zero():
  x = _x(batch=2)
  with_conv = _make("linear", conv_kernel=3)
  params = nn.unbox(_init(with_conv, x))
  without = {"params": {k: v for k, v in params["params"].items()
                        if k != "dwconv"}}
  np.testing.assert_allclose(
      _apply(with_conv, params, x),
      _apply(_make("linear", conv_kernel=0), without, x), atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_unknown_mixer_lists_registered():
  with pytest.raises(ValueError, match="registered mixers") as e:
    models.build_model("DiT-S/2", mixer="nope")
  for name in MIXERS:
    assert name in str(e.value)


@pytest.mark.parametrize("name,options", [
    ("window", {"window": 3}),
    ("proxy", {"proxy_window": 3}),
    ("proxy", {"window": 5}),
    ("kv_compress", {"ratio": 3}),
])
def test_sizes_not_dividing_grid(name, options):
  mixer = _make(name, **options)
  with pytest.raises(ValueError, match=r"divide the token grid \(8, 8\)"):
    _init(mixer, _x(batch=1))


def test_bad_shift_and_shape():
  with pytest.raises(ValueError, match="shift"):
    _init(_make("window", window=4, shift=4), _x(batch=1))
  with pytest.raises(ValueError, match="circle"):
    _init(_make("local", shape="diamond"), _x(batch=1))
  with pytest.raises(ValueError, match="scan_order"):
    _init(_make("mamba", scan_order="hilbert"), _x(batch=1))
  with pytest.raises(ValueError, match="feature_map"):
    _init(_make("linear", feature_map="softmax"), _x(batch=1))


def test_options_of_another_mixer_rejected():
  with pytest.raises(ValueError, match="do not belong to mixer 'window'"):
    models.build_model("DiT-S/2", mixer="window",
                       mixer_options={"ratio": 2})
  with pytest.raises(ValueError, match="accepts"):
    models.build_model("DiT-S/2", mixer="mamba",
                       mixer_options={"window": 4})
