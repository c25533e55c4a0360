"""Classifier-free guidance: algebra, channels, interval, batching."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import diffusion
from jdit.diffusion import guidance as guidance_lib

NULL = 10
B, C = 3, 4


def _known_model(learn_sigma):
  """Output = COND where y != NULL, UNCOND where y == NULL (fixed arrays)."""
  rng = np.random.default_rng(0)
  c_out = 2 * C if learn_sigma else C
  cond = jnp.asarray(rng.standard_normal((B, 2, 2, c_out)), jnp.float32)
  uncond = jnp.asarray(rng.standard_normal((B, 2, 2, c_out)), jnp.float32)

  def model_fn(x, t, y):
    del t
    n = x.shape[0] // B
    is_null = (y == NULL)[:, None, None, None]
    return jnp.where(is_null, jnp.tile(uncond, (n, 1, 1, 1)),
                     jnp.tile(cond, (n, 1, 1, 1)))

  return model_fn, np.asarray(cond), np.asarray(uncond)


def _guided(model_fn, guidance, y):
  """The guided form of a plain network: (fn, initial state)."""
  return guidance_lib.guided_model(guidance_lib.stateless(model_fn), guidance,
                                   y, C)


@pytest.mark.parametrize("learn_sigma,channels", [(False, None), (True, None),
                                                  (True, 3), (False, 2)])
def test_guided_channels(learn_sigma, channels):
  model_fn, cond, uncond = _known_model(learn_sigma)
  w = 2.5
  g = diffusion.Guidance(scale=w, null_label=NULL, channels=channels)
  y = jnp.arange(B)
  fn, state = _guided(model_fn, g, y)
  x, t = jnp.zeros((B, 2, 2, C)), jnp.full((B,), 0.5)
  out = np.asarray(fn(x, t, t, state)[0])
  k = C if channels is None else channels
  np.testing.assert_allclose(out[..., :k],
                             uncond[..., :k] + w * (cond[..., :k]
                                                    - uncond[..., :k]),
                             rtol=1e-6)
  # Everything else (eps channels past k, variance channels) is conditional.
  np.testing.assert_array_equal(out[..., k:], cond[..., k:])


@pytest.mark.parametrize("phi", [1.0, 0.7])
def test_rescale_matches_the_conditional_std(phi):
  model_fn, cond, uncond = _known_model(True)
  w, k = 4.0, 3
  g = diffusion.Guidance(scale=w, null_label=NULL, channels=k, rescale=phi)
  fn, state = _guided(model_fn, g, jnp.arange(B))
  x, t = jnp.zeros((B, 2, 2, C)), jnp.full((B,), 0.5)
  out = np.asarray(fn(x, t, t, state)[0])
  cfg = (uncond + w * (cond - uncond))[..., :k].astype(np.float64)
  std = lambda a: a.reshape(B, -1).std(axis=1)[:, None, None, None]
  want = cfg * (phi * std(cond[..., :k].astype(np.float64)) / std(cfg)
                + 1 - phi)
  np.testing.assert_allclose(out[..., :k], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[..., k:], cond[..., k:])
  if phi == 1.0:  # each example keeps the conditional output's spread
    np.testing.assert_allclose(std(out[..., :k]), std(cond[..., :k]),
                               rtol=1e-5)


def test_scale_one_is_off_and_zero_is_unconditional():
  model_fn, cond, uncond = _known_model(False)
  y, x, t = jnp.arange(B), jnp.zeros((B, 2, 2, C)), jnp.full((B,), 0.5)
  sizes = []

  def counting(x, t, y):
    sizes.append(x.shape[0])
    return model_fn(x, t, y)

  off, state = _guided(counting, diffusion.Guidance(1.0, NULL), y)
  np.testing.assert_array_equal(off(x, t, t, state)[0], cond)
  assert sizes == [B]  # No doubled batch when guidance is off.
  zero, state = _guided(model_fn, diffusion.Guidance(0.0, NULL), y)
  np.testing.assert_allclose(zero(x, t, t, state)[0], uncond, rtol=1e-6)


@pytest.mark.parametrize("learn_sigma,channels", [(False, None), (True, 3)])
def test_autoguidance_replaces_the_unconditional_branch(learn_sigma,
                                                         channels):
  """out = guide + w (cond - guide) from a B-row call of each network; the
  null label is never used."""
  model_fn, cond, _ = _known_model(learn_sigma)
  guide = np.random.default_rng(1).standard_normal((B, 2, 2, C)).astype(
      np.float32)
  calls = []

  def counting(x, t, y):
    calls.append((x.shape[0], np.asarray(y).tolist()))
    return model_fn(x, t, y)

  w = 2.5
  g = diffusion.Guidance(scale=w, null_label=NULL, channels=channels)
  y = jnp.arange(B)
  fn, state = guidance_lib.guided_model(
      guidance_lib.stateless(counting), g, y, C,
      guide_fn=lambda x, t, yy: jnp.asarray(guide) + 0 * yy[:, None, None,
                                                               None])
  x, t = jnp.zeros((B, 2, 2, C)), jnp.full((B,), 0.5)
  out = np.asarray(fn(x, t, t, state)[0])
  k = C if channels is None else channels
  np.testing.assert_allclose(out[..., :k], guide[..., :k] + w * (
      cond[..., :k] - guide[..., :k]), rtol=1e-6)
  np.testing.assert_array_equal(out[..., k:], cond[..., k:])
  assert calls == [(B, [0, 1, 2])]


def test_autoguidance_interval_end_to_end():
  """Euler, 2 steps: t = 1 is guided by the guide network, t = 0.5 (outside
  [0.6, 1]) is the conditional output alone."""
  model_fn, cond, _ = _known_model(False)
  guide = np.full((B, 2, 2, C), 0.25, np.float32)
  w = 3.0
  g = diffusion.Guidance(scale=w, null_label=NULL, interval=(0.6, 1.0))
  x = _flow().sample(model_fn, jnp.ones((B, 2, 2, C)), jax.random.PRNGKey(0),
                     y=jnp.arange(B), sampler="euler", steps=2, guidance=g,
                     guide_fn=lambda x, t, y: jnp.asarray(guide))
  guided = guide + w * (cond - guide)
  np.testing.assert_allclose(x, 1.0 - 0.5 * guided - 0.5 * cond, rtol=1e-5,
                             atol=1e-5)


def _flow():
  return diffusion.create("flow", diffusion.default_config(),
                          learn_sigma=False)


def test_one_batched_call_per_step():
  """Guided sampling traces the network once, on the 2B batch."""
  model_fn, _, _ = _known_model(False)
  sizes = []

  def counting(x, t, y):
    sizes.append(x.shape[0])  # Python side effect: runs at trace time.
    return model_fn(x, t, y)

  obj = _flow()
  g = diffusion.Guidance(scale=4.0, null_label=NULL)
  sample = jax.jit(functools.partial(obj.sample, counting, sampler="euler",
                                     steps=7, guidance=g))
  sample(jnp.zeros((B, 2, 2, C)), jax.random.PRNGKey(0), y=jnp.arange(B))
  assert sizes == [2 * B]


def test_flow_interval_end_to_end():
  """Euler, 2 steps: t = 1 is guided, t = 0.5 is outside [0.6, 1]."""
  model_fn, cond, uncond = _known_model(False)
  obj = _flow()
  w = 3.0
  g = diffusion.Guidance(scale=w, null_label=NULL, interval=(0.6, 1.0))
  noise = jnp.ones((B, 2, 2, C))
  x = obj.sample(model_fn, noise, jax.random.PRNGKey(0), y=jnp.arange(B),
                 sampler="euler", steps=2, guidance=g)
  guided = uncond + w * (cond - uncond)
  np.testing.assert_allclose(x, 1.0 - 0.5 * guided - 0.5 * cond, rtol=1e-5,
                             atol=1e-5)


def test_ddpm_interval_in_normalised_time():
  """Only steps with t/T in [lo, hi] evaluate the 2B (guided) batch."""
  calls = []

  def model_fn(x, t, y):
    del y
    # Runtime record of (batch size, timesteps) for every network call.
    jax.debug.callback(lambda tt, n=x.shape[0]: calls.append((n, float(tt[0]))),
                       t)
    return jnp.zeros(x.shape[:-1] + (2 * C,))

  obj = diffusion.create("ddpm", diffusion.default_config(), learn_sigma=True)
  g = diffusion.Guidance(scale=2.0, null_label=NULL, interval=(0.0, 0.5))
  sample = jax.jit(functools.partial(obj.sample, model_fn, sampler="ddim",
                                     steps=10, guidance=g))
  jax.block_until_ready(sample(jnp.zeros((B, 2, 2, C)), jax.random.PRNGKey(0),
                               y=jnp.arange(B)))
  ts = [t for _, t in calls]
  # ADM spacing "10": 0, 111, ..., 999 (stride 999/9 = 111).
  assert sorted(ts) == [float(111 * i) for i in range(10)]
  for n, t in calls:
    assert n == (2 * B if t / 1000 <= 0.5 else B), (n, t)


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": -1.0}, ">= 0"),
    ({"channels": 0}, ">= 1"),
    ({"interval": (0.5, 0.2)}, "lo <= hi"),
    ({"interval": (-0.1, 1.0)}, "0 <= lo"),
    ({"interval": (0.0, 1.5)}, "hi <= 1"),
    ({"rescale": 1.5}, "rescale must be in"),
])
def test_bad_guidance(kwargs, match):
  with pytest.raises(ValueError, match=match):
    diffusion.Guidance(**kwargs)


def test_guidance_needs_labels_and_enough_channels():
  model_fn, _, _ = _known_model(False)
  with pytest.raises(ValueError, match="needs labels"):
    _guided(model_fn, diffusion.Guidance(2.0), None)
  with pytest.raises(ValueError, match="exceeds"):
    _guided(model_fn, diffusion.Guidance(2.0, channels=5), jnp.arange(B))
