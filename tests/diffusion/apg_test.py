"""Adaptive projected guidance: against a float64 transcription of the
paper's algorithm (in x0 space), its reduction to CFG, the objectives' x0
maps, and sampling through every objective."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdit import diffusion
from jdit.diffusion import guidance as guidance_lib
from jdit.diffusion import paths

NULL = 10
B, C = 3, 4


def _known_model(seed=0, c_out=C):
  """Output = COND rows where y != NULL, UNCOND where y == NULL."""
  rng = np.random.default_rng(seed)
  cond = rng.standard_normal((B, 5, 5, c_out)).astype(np.float32)
  uncond = rng.standard_normal((B, 5, 5, c_out)).astype(np.float32)

  def model_fn(x, t, y):
    del t
    n = x.shape[0] // B
    return jnp.where((y == NULL)[:, None, None, None],
                     jnp.tile(uncond, (n, 1, 1, 1)),
                     jnp.tile(cond, (n, 1, 1, 1)))

  return model_fn, cond, uncond


def _reference(cond, uncond, x, a, b, w, eta, r, beta, previous):
  """The paper's algorithm, per example, on denoised estimates (float64):
  diff = D_c - D_u, momentum, norm clipping, projection onto D_c."""
  out, new_previous = [], []
  for i in range(len(x)):
    d_c = a[i] * x[i] + b[i] * cond[i]
    d_u = a[i] * x[i] + b[i] * uncond[i]
    diff = d_c - d_u
    if beta:
      diff = diff + beta * previous[i]
    new_previous.append(diff)
    if r:
      diff = diff * min(1.0, r / np.linalg.norm(diff))
    v1 = d_c / np.linalg.norm(d_c)
    parallel = np.sum(diff * v1) * v1
    guided = d_c + (w - 1) * (diff - parallel + eta * parallel)
    out.append((guided - a[i] * x[i]) / b[i])
  return np.stack(out), np.stack(new_previous)


@pytest.mark.parametrize("eta,r,beta", [(0.0, 0.0, 0.0), (0.3, 2.0, -0.5),
                                        (0.0, 1e-3, 0.4)])
def test_matches_the_papers_algorithm(eta, r, beta):
  model_fn, cond, uncond = _known_model()
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, 5, 5, C)).astype(np.float32)
  coeffs = {0.9: (rng.uniform(0.5, 2, B), -rng.uniform(0.1, 1, B)),
            0.4: (rng.uniform(0.5, 2, B), rng.uniform(0.1, 1, B))}
  w = 4.0
  g = diffusion.Guidance(scale=w, null_label=NULL, apg_eta=eta,
                         apg_norm_threshold=r, apg_momentum=beta)
  fn, state = guidance_lib.guided_model(
      guidance_lib.stateless(model_fn), g, jnp.arange(B), C,
      x0_affine=lambda t: tuple(jnp.asarray(v, jnp.float32)
                                for v in coeffs[round(float(t[0]), 1)]),
      x_shape=x.shape)
  assert len(state) == (4 if beta else 3)
  previous = np.zeros(x.shape)
  for t in (0.9, 0.4):  # two evaluations: the momentum carries over
    out, state = fn(jnp.asarray(x), jnp.full((B,), t), jnp.full((B,), t),
                    state)
    a, b = coeffs[t]
    want, previous = _reference(cond.astype(np.float64), uncond, x, a, b, w,
                                eta, r, beta, previous)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    if beta:
      np.testing.assert_allclose(state[3], previous, rtol=1e-5, atol=1e-5)


def test_eta_one_without_clipping_or_momentum_is_cfg():
  model_fn, cond, uncond = _known_model(c_out=2 * C)  # learned sigma
  x = jnp.asarray(np.random.default_rng(2).standard_normal((B, 5, 5, C)),
                  jnp.float32)
  t = jnp.full((B,), 0.5)
  affine = lambda t: (jnp.full_like(t, 1.3), jnp.full_like(t, -0.7))
  outs = []
  for eta in (1.0, None):
    g = diffusion.Guidance(scale=3.0, null_label=NULL, channels=3,
                           apg_eta=eta)
    fn, state = guidance_lib.guided_model(
        guidance_lib.stateless(model_fn), g, jnp.arange(B), C,
        x0_affine=affine)
    outs.append(np.asarray(fn(x, t, t, state)[0]))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(outs[0][..., 3:], cond[..., 3:])


def test_where_out_does_not_move_x0_it_is_cfg():
  """b = 0 (a flow's velocity at t = 0): there is no x0-space update."""
  model_fn, cond, uncond = _known_model()
  g = diffusion.Guidance(scale=2.0, null_label=NULL, apg_eta=0.0)
  fn, state = guidance_lib.guided_model(
      guidance_lib.stateless(model_fn), g, jnp.arange(B), C,
      x0_affine=lambda t: (jnp.ones_like(t), jnp.zeros_like(t)))
  x, t = jnp.ones((B, 5, 5, C)), jnp.zeros((B,))
  out = np.asarray(fn(x, t, t, state)[0])
  np.testing.assert_allclose(out, uncond + 2.0 * (cond - uncond), rtol=1e-6)


def _ddpm(**kw):
  return diffusion.create("ddpm", ml_collections.ConfigDict({"ddpm": kw}),
                          learn_sigma=False)


def _flow(**kw):
  return diffusion.create("flow", ml_collections.ConfigDict({"flow": kw}),
                          learn_sigma=False)


def test_ddpm_x0_map_is_adms():
  obj = _ddpm()
  rng = np.random.default_rng(3)
  x, eps = rng.standard_normal((2, 4, 2, 2, C)).astype(np.float32)
  t = np.array([0, 17, 500, 999])
  a, b = obj.x0_affine(jnp.asarray(t / obj.num_timesteps, jnp.float32))
  want = obj.diffusion.pred_xstart_from_eps(jnp.asarray(x),
                                               jnp.asarray(t), eps)
  got = a[:, None, None, None] * x + b[:, None, None, None] * eps
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path,prediction,flip", [
    ("linear", "velocity", False), ("linear", "velocity", True),
    ("gvp", "noise", False), ("linear", "score", False)])
def test_flow_x0_map_is_tweedies(path, prediction, flip):
  obj = _flow(path=path, prediction=prediction, model_time_flip=flip)
  rng = np.random.default_rng(4)
  x, out = rng.standard_normal((2, 3, 2, 2, C)).astype(np.float32)
  t = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
  a, b = obj.x0_affine(t)
  want = paths.to_x0(prediction, obj.prediction_of(jnp.asarray(out)), x, t,
                     path)
  got = a[:, None, None, None] * x + b[:, None, None, None] * out
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _net(x, t, y):
  """A smooth class-dependent network: guidance changes its samples."""
  scale = 1.0 + 0.1 * y[:, None, None, None].astype(jnp.float32)
  return jnp.tanh(scale * x + 1e-3 * t[:, None, None, None])


@pytest.mark.parametrize("objective,sampler", [
    (_flow, "heun"), (_flow, "sde"), (_ddpm, "ddim"), (_ddpm, "dpm++")])
def test_sampling_with_apg(objective, sampler):
  obj = objective()
  noise = jax.random.normal(jax.random.key(0), (B, 4, 4, C))
  y = jnp.array([1, 2, 3])
  run = jax.jit(functools.partial(obj.sample, _net, y=y, sampler=sampler,
                                  steps=6), static_argnames="guidance")
  key = jax.random.key(1)
  cfg = run(noise, key, guidance=diffusion.Guidance(3.0, null_label=NULL))
  same = run(noise, key, guidance=diffusion.Guidance(3.0, null_label=NULL,
                                                     apg_eta=1.0))
  np.testing.assert_allclose(same, cfg, rtol=1e-4, atol=1e-4)
  apg = run(noise, key, guidance=diffusion.Guidance(
      3.0, null_label=NULL, apg_eta=0.0, apg_norm_threshold=5.0,
      apg_momentum=-0.5, interval=(0.2, 1.0)))
  assert np.all(np.isfinite(apg)) and not np.allclose(apg, cfg, atol=1e-3)


@pytest.mark.parametrize("kw,message", [
    ({"apg_momentum": -0.5}, "set apg_eta too"),
    ({"apg_eta": 0.0, "scale": 1.0}, "other than 1"),
    ({"apg_eta": 0.0, "apg_norm_threshold": -1.0}, "must be >= 0"),
    ({"apg_eta": 0.0, "apg_momentum": 1.0}, r"must be in \(-1, 1\)"),
])
def test_bad_apg_settings(kw, message):
  with pytest.raises(ValueError, match=message):
    diffusion.Guidance(**{"scale": 2.0, **kw})
