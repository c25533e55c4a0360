"""Positions past the trained grid: PI, NTK-aware and YaRN scaling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.models import build_model
from jdit.models import embed
from tests.conftest import random_params


def _eva_angles(rows, cols, part, freqs_r, freqs_c):
  """Angles of EVA-02's 2D layout, written out per token and channel."""
  out = []
  for r, c in zip(rows.reshape(-1), cols.reshape(-1)):
    row = [r * f for f in freqs_r for _ in range(2)]
    col = [c * f for f in freqs_c for _ in range(2)]
    out.append(row + col)
  assert len(out[0]) == 2 * part
  return np.asarray(out)


@pytest.mark.parametrize("method", embed.EXTRAPOLATIONS)
def test_nothing_changes_within_the_trained_grid(method):
  for grid, base in [((4, 6), (4, 6)), ((4, 6), (8, 6)), ((3, 3), None)]:
    want = embed.rotary_tables(grid, 16)
    got = embed.rotary_tables(grid, 16, base_grid=base, extrapolation=method)
    np.testing.assert_allclose(got, want, atol=1e-7)
    np.testing.assert_allclose(
        embed.sincos_2d(32, *grid, base_grid=base, extrapolation=method),
        embed.sincos_2d(32, *grid), atol=1e-7)


def test_interpolation_maps_positions_into_the_trained_range():
  grid, base, part = (8, 4), (4, 4), 8
  rows, cols = np.meshgrid(np.arange(8), np.arange(4), indexing="ij")
  freqs = [10000.0 ** (-2 * i / part) for i in range(part // 2)]
  angles = _eva_angles(rows / 2, cols, part, freqs, freqs)
  cos, sin = embed.rotary_tables(grid, 2 * part, base_grid=base,
                                 extrapolation="interpolate")
  np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
  np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
  # The sin-cos embedding: row 2k of the larger grid = row k of the trained.
  big = embed.sincos_2d(16, 8, 4, base_grid=base, extrapolation="interpolate")
  small = embed.sincos_2d(16, 4, 4)
  np.testing.assert_allclose(big.reshape(8, 4, 16)[::2], small.reshape(4, 4,
                                                                       16),
                             atol=1e-6)


def test_ntk_keeps_the_highest_and_interpolates_the_lowest_frequency():
  d, s = 16, 3.0
  plain = embed.scaled_frequencies(d, 10000.0, 1.0, 8, "extrapolate")
  ntk = embed.scaled_frequencies(d, 10000.0, s, 8, "ntk")
  assert ntk[0] == plain[0] == 1.0
  np.testing.assert_allclose(ntk[-1], plain[-1] / s, rtol=1e-12)
  assert np.all(ntk[1:-1] < plain[1:-1]) and np.all(ntk[1:-1] > plain[1:-1] / s)


def test_yarn_blends_by_wavelength():
  d, base_len, s = 64, 256, 2.0
  plain = embed.scaled_frequencies(d, 10000.0, 1.0, base_len, "extrapolate")
  yarn = embed.scaled_frequencies(d, 10000.0, s, base_len, "yarn")
  periods = base_len * plain / (2 * np.pi)  # within the trained length
  short = periods >= 32
  long = periods <= 1
  mid = ~short & ~long
  assert short.any() and long.any() and mid.any()
  np.testing.assert_allclose(yarn[short], plain[short])
  np.testing.assert_allclose(yarn[long], plain[long] / s)
  assert np.all((yarn[mid] < plain[mid]) & (yarn[mid] > plain[mid] / s))
  # Rotary tables carry YaRN's logit temperature on q and k.
  cos, sin = embed.rotary_tables((8, 12), 16, base_grid=(4, 4),
                                 extrapolation="yarn")
  np.testing.assert_allclose(cos ** 2 + sin ** 2,
                             (0.1 * np.log(2 * 3) + 1) ** 2, rtol=1e-5)


def _model(**kw):
  return build_model("DiT-S/2", in_channels=1, num_classes=10, depth=2,
                     hidden_size=32, num_heads=2,
                     mixer_options={"rope": True}, **kw)


def test_dit_runs_past_its_trained_grid():
  x = jax.random.normal(jax.random.key(0), (2, 16, 12, 1))
  t, y = jnp.array([10.0, 500.0]), jnp.array([1, 2])
  params = random_params(_model(input_size=8), scale=0.3)
  outs = {}
  for method in embed.EXTRAPOLATIONS:
    big = _model(input_size=(16, 12), base_grid=(4, 4), extrapolation=method)
    outs[method] = jax.jit(big.apply)({"params": params}, x, t, y)
    assert outs[method].shape == (2, 16, 12, 2)
    assert np.all(np.isfinite(outs[method]))
  plain = jax.jit(_model(input_size=(16, 12)).apply)({"params": params}, x,
                                                     t, y)
  np.testing.assert_allclose(outs["extrapolate"], plain, atol=1e-6)
  for method in ("interpolate", "ntk", "yarn"):
    assert np.abs(np.asarray(outs[method] - plain)).max() > 1e-4, method


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="extrapolation must be one of"):
    _model(input_size=8, extrapolation="stretch")
  with pytest.raises(ValueError, match="base_grid must be"):
    _model(input_size=8, base_grid=(4,))
  with pytest.raises(ValueError, match="base_grid must give"):
    embed.rotary_tables((4, 4), 16, base_grid=(4, 4, 4))
