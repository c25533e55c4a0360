"""The PT-DiT proxy mixer: the paper's window sizes and the explicit formula."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import models  # noqa: F401  (registers every mixer)
from jdit.models import local_mixers
from jdit.models.mixers import get_mixer
from jdit.models.proxy_mixer import proxy_sizes

DIM, HEADS = 32, 4


@pytest.mark.parametrize("side,ratio", [(16, 2), (32, 4), (64, 8),
                                        (128, 16)])
def test_default_proxy_windows_follow_the_paper(side, ratio):
  # Qihoo-T2X Sec. 3.2.3: compression (1, 2, 2) ... (1, 16, 16) at 256 ...
  # 2048px, i.e. 8x8 proxies; the window attention uses the same windows,
  # and the shifted heads move by half a window.
  pwin, window, shift = proxy_sizes((side, side))
  assert pwin == window == (ratio, ratio)
  assert shift == (ratio // 2, ratio // 2)


def test_proxy_sizes_options():
  # An int proxy_grid leaves time unpooled; tuples and windows override.
  assert proxy_sizes((4, 16, 16))[0] == (1, 2, 2)
  assert proxy_sizes((4, 16, 16), proxy_grid=(1, 8, 8))[0] == (4, 2, 2)
  assert proxy_sizes((16, 16), proxy_window=4) == ((4, 4), (4, 4), (2, 2))
  assert proxy_sizes((16, 16), window=8, shift=0)[1:] == ((8, 8), (0, 0))
  with pytest.raises(ValueError, match=r"proxy_grid \(8, 8\) must divide"):
    proxy_sizes((4, 4))


def _dense(x, p, eq):
  return jnp.einsum(eq, x, p["kernel"]) + p["bias"]


def test_matches_explicit_formula():
  # proxies = 2x2 window means (pooled by reshape here, not by the mixer's
  # window partition), self-attention among them, cross-attention of every
  # token to them, then windowed attention of x + GIIM(x); returns
  # GIIM(x) + TCM(x + GIIM(x)).
  grid, b = (8, 8), 2
  x = jax.random.normal(jax.random.PRNGKey(0), (b, 64, DIM))
  mixer = get_mixer("proxy")(num_heads=HEADS, proxy_grid=4)
  params = nn.unbox(mixer.init(jax.random.PRNGKey(1), x, grid_shape=grid))
  p = dict(params["params"])
  # The GIIM output starts at zero; give it weights so it is tested too.
  p["cross_proj"] = dict(p["cross_proj"], kernel=0.1 * jax.random.normal(
      jax.random.PRNGKey(2), p["cross_proj"]["kernel"].shape))
  attn = jax.nn.dot_product_attention
  pooled = x.reshape(b, 4, 2, 4, 2, DIM).mean((2, 4)).reshape(b, 16, DIM)
  pqkv = _dense(pooled, p["proxy_qkv"], "bld,dthk->blthk")
  proxies = _dense(attn(pqkv[:, :, 0], pqkv[:, :, 1], pqkv[:, :, 2]),
                   p["proxy_proj"], "blhk,hkd->bld")
  q = _dense(x, p["cross_q"], "bld,dthk->blthk")[:, :, 0]
  kv = _dense(proxies, p["cross_kv"], "bld,dthk->blthk")
  g = _dense(attn(q, kv[:, :, 0], kv[:, :, 1]), p["cross_proj"],
             "blhk,hkd->bld")
  qkv = _dense(x + g, p["qkv"], "bld,dthk->blthk")
  t = local_mixers._shifted_window_attention(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], grid, (2, 2), (1, 1))
  want = g + _dense(t, p["proj"], "blhk,hkd->bld")
  got = mixer.apply({"params": p}, x, grid_shape=grid)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_global_branch_starts_switched_off():
  # The paper's zero-initialised linear: at init the proxy path cannot
  # change the output, so a fresh block is the window attention alone.
  grid = (8, 8)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 64, DIM))
  mixer = get_mixer("proxy")(num_heads=HEADS, proxy_grid=4)
  params = nn.unbox(mixer.init(jax.random.PRNGKey(1), x, grid_shape=grid))
  p = params["params"]
  assert not np.any(p["cross_proj"]["kernel"])
  scrambled = dict(p, proxy_qkv=jax.tree.map(lambda a: a + 1.0,
                                             p["proxy_qkv"]))
  np.testing.assert_allclose(
      mixer.apply({"params": scrambled}, x, grid_shape=grid),
      mixer.apply(params, x, grid_shape=grid), atol=1e-6)


def test_macs_keep_64_proxies_at_every_resolution():
  mixer = get_mixer("proxy")(num_heads=16)
  d = 1152
  for side in (16, 32, 64):
    n = side * side
    p = (side // 8) ** 2  # tokens per proxy window
    # Proxy self-attention on 64 tokens, cross-attention to them, and the
    # window attention in the proxy windows.
    want = (4 * 64 * d * d + 2 * 64 * 64 * d
            + 2 * n * d * d + 2 * 64 * d * d + 2 * n * 64 * d
            + 4 * n * d * d + 2 * n * p * d)
    assert mixer.macs((side, side), d) == want
