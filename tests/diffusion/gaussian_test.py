"""ADM Gaussian diffusion numerics against independent float64 formulas."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from jdit.diffusion import gaussian

T = 1000


def _abar(t_count=T):
  betas = np.linspace(1e-4 * 1000 / t_count, 0.02 * 1000 / t_count, t_count)
  return betas, np.array([np.prod(1 - betas[:i + 1]) for i in range(t_count)])


@pytest.fixture(scope="module")
def diff():
  return gaussian.GaussianDiffusion(
      gaussian.get_beta_schedule("linear", T), variance="learned_range")


def test_linear_schedule_is_dit():
  np.testing.assert_allclose(gaussian.get_beta_schedule("linear", 1000),
                             np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
  # "Scaled for 1000 steps": T=250 spans 4e-4 .. 0.08.
  b = gaussian.get_beta_schedule("linear", 250)
  np.testing.assert_allclose([b[0], b[-1]], [4e-4, 0.08], rtol=1e-12)


def test_q_sample_closed_form(diff):
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((6, 4, 4, 3))
  noise = rng.standard_normal(x0.shape)
  t = np.array([0, 1, 10, 500, 998, 999])
  _, abar = _abar()
  expected = (np.sqrt(abar[t])[:, None, None, None] * x0
              + np.sqrt(1 - abar[t])[:, None, None, None] * noise)
  got = diff.q_sample(jnp.asarray(x0, jnp.float32), t,
                      jnp.asarray(noise, jnp.float32))
  chex.assert_shape(got, x0.shape)
  np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-5)


def test_q_posterior_matches_bayes_rule(diff):
  """q(x_{t-1} | x_t, x0) by completing the square, in float64."""
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((5, 2, 2, 2))
  xt = rng.standard_normal(x0.shape)
  t = np.array([1, 2, 100, 700, 999])
  betas, abar = _abar()
  bt, at, ab_prev = betas[t], 1 - betas[t], abar[t - 1]
  # Product of N(x_t; sqrt(a_t) x, b_t) and N(x; sqrt(abar_{t-1}) x0,
  # 1 - abar_{t-1}) as a Gaussian in x.
  prec = at / bt + 1 / (1 - ab_prev)
  var = 1 / prec
  e = lambda v: v[:, None, None, None]
  mean = e(var) * (e(np.sqrt(at) / bt) * xt
                   + e(np.sqrt(ab_prev) / (1 - ab_prev)) * x0)
  got_mean, got_var, got_logvar = diff.q_posterior_mean_variance(
      jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), t)
  np.testing.assert_allclose(got_mean, mean, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_var[:, 0, 0, 0], var, rtol=1e-5)
  np.testing.assert_allclose(got_logvar[:, 0, 0, 0], np.log(var), rtol=1e-5)
  # t = 0: the posterior collapses onto x0; the log-variance is clipped to
  # the t = 1 value (ADM).
  m0, v0, lv0 = diff.q_posterior_mean_variance(
      jnp.asarray(x0[:1], jnp.float32), jnp.asarray(xt[:1], jnp.float32),
      np.array([0]))
  np.testing.assert_allclose(m0, x0[:1], atol=1e-6)
  assert float(v0.max()) == 0.0
  np.testing.assert_allclose(lv0.ravel()[0], np.log(betas[1] * (1 - abar[0])
                                                    / (1 - abar[1])),
                             rtol=1e-5)


def test_normal_kl():
  rng = np.random.default_rng(2)
  m1, m2 = rng.standard_normal(10), rng.standard_normal(10)
  s1, s2 = np.exp(rng.standard_normal(10)), np.exp(rng.standard_normal(10))
  expected = (np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2)
              - 0.5)
  got = gaussian.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_discretized_gaussian_log_likelihood():
  rng = np.random.default_rng(3)
  # Pixel values on the 256-level grid in [-1, 1], including both edges.
  x = np.concatenate([[-1.0, 1.0], rng.integers(0, 256, 30) / 127.5 - 1])
  means = np.clip(x + 0.05 * rng.standard_normal(x.shape), -1, 1)
  log_scales = np.log(rng.uniform(0.005, 0.2, x.shape))
  got = np.asarray(gaussian.discretized_gaussian_log_likelihood(
      jnp.asarray(x), jnp.asarray(means), jnp.asarray(log_scales)))
  sd = np.exp(log_scales)
  cdf = lambda v: special.ndtr(v)  # Exact normal CDF.
  upper = np.where(x > 0.999, 1.0, cdf((x - means + 1 / 255) / sd))
  lower = np.where(x < -0.999, 0.0, cdf((x - means - 1 / 255) / sd))
  exact = np.log(np.maximum(upper - lower, 1e-12))
  # ADM uses a tanh approximation of the CDF: close, not identical.
  np.testing.assert_allclose(got, exact, atol=2e-3, rtol=2e-3)
  # And the approximation itself, written out in float64.
  approx = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi)
                                        * (v + 0.044715 * v ** 3)))
  upper = np.where(x > 0.999, 1.0, approx((x - means + 1 / 255) / sd))
  lower = np.where(x < -0.999, 0.0, approx((x - means - 1 / 255) / sd))
  np.testing.assert_allclose(got, np.log(np.maximum(upper - lower, 1e-12)),
                             atol=1e-4, rtol=1e-4)


def test_learned_range_variance_endpoints(diff):
  x = jnp.zeros((3, 2, 2, 1))
  t = np.array([0, 5, 999])
  betas, abar = _abar()
  post = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
  post_clipped = np.concatenate([[post[0]], post])
  for v, expected in [(1.0, np.log(betas[t])), (-1.0, np.log(post_clipped[t])),
                      (0.0, 0.5 * np.log(betas[t] * post_clipped[t]))]:
    out = jnp.concatenate([x, jnp.full_like(x, v)], -1)
    lv = diff.p_mean_variance(out, x, t)["log_variance"]
    np.testing.assert_allclose(lv[:, 0, 0, 0], expected, rtol=1e-5)


def test_vb_terms_against_numpy(diff):
  rng = np.random.default_rng(4)
  b = 4
  x0 = rng.integers(0, 256, (b, 2, 2, 3)) / 127.5 - 1
  noise = rng.standard_normal(x0.shape)
  t = np.array([0, 1, 300, 999])
  betas, abar = _abar()
  e = lambda v: v[:, None, None, None]
  xt = e(np.sqrt(abar[t])) * x0 + e(np.sqrt(1 - abar[t])) * noise
  eps = rng.standard_normal(x0.shape)
  v = rng.uniform(-1, 1, x0.shape)
  # Model mean and variance, by hand.
  abar_prev = np.concatenate([[1.0], abar[:-1]])[t]
  post = betas * (1 - np.concatenate([[1.0], abar[:-1]])) / (1 - abar)
  post_clipped = np.concatenate([[post[1]], post[1:]])[t]
  pred_x0 = (xt - e(np.sqrt(1 - abar[t])) * eps) / e(np.sqrt(abar[t]))
  c1 = betas[t] * np.sqrt(abar_prev) / (1 - abar[t])
  c2 = (1 - abar_prev) * np.sqrt(1 - betas[t]) / (1 - abar[t])
  model_mean = e(c1) * pred_x0 + e(c2) * xt
  frac = (v + 1) / 2
  model_lv = frac * e(np.log(betas[t])) + (1 - frac) * e(np.log(post_clipped))
  true_mean = e(c1) * x0 + e(c2) * xt
  true_lv = e(np.log(post_clipped))
  kl = 0.5 * (-1 + model_lv - true_lv + np.exp(true_lv - model_lv)
              + (true_mean - model_mean) ** 2 * np.exp(-model_lv))
  sd = np.exp(0.5 * model_lv)
  # ADM's decoder uses the tanh CDF approximation (checked against the exact
  # CDF above); at t = 0 its tails matter, so use it here too.
  cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi)
                                     * (v + 0.044715 * v ** 3)))
  upper = np.where(x0 > 0.999, 1.0, cdf((x0 - model_mean + 1 / 255) / sd))
  lower = np.where(x0 < -0.999, 0.0, cdf((x0 - model_mean - 1 / 255) / sd))
  nll = -np.log(np.maximum(upper - lower, 1e-12))
  expected = np.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3)))
  expected = expected / math.log(2)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got, _ = jax.jit(diff.vb_terms_bpd)(f32(np.concatenate([eps, v], -1)),
                                      f32(x0), f32(xt), t)
  np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4)


def test_hybrid_loss_terms_and_stop_gradient(diff):
  """DiT hybrid loss: mse + vb, vb sees the eps half through stop_gradient."""
  rng = np.random.default_rng(5)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = np.array([0, 3, 400, 999])
  xt = diff.q_sample(x0, t, noise)
  out = jnp.asarray(rng.standard_normal((4, 4, 4, 6)), jnp.float32) * 0.3
  terms = jax.jit(diff.training_losses)(out, x0, xt, t, noise)
  assert set(terms) == {"loss", "mse", "vb"}
  np.testing.assert_allclose(terms["mse"], np.mean(
      (np.asarray(noise) - np.asarray(out[..., :3])) ** 2, (1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"],
                             rtol=1e-6)
  grad_vb = jax.jit(jax.grad(lambda o: jnp.sum(
      diff.training_losses(o, x0, xt, t, noise)["vb"])))(out)
  assert float(jnp.abs(grad_vb[..., :3]).max()) == 0.0  # frozen mean
  assert float(jnp.abs(grad_vb[..., 3:]).max()) > 0.0   # trains sigma
  # DiT's default loss is NOT rescaled; "rescaled_mse" multiplies vb by
  # T / 1000 (= 1 at T = 1000, so check with T = 500).
  betas = gaussian.get_beta_schedule("linear", 500)
  plain = gaussian.GaussianDiffusion(betas, loss_type="mse")
  scaled = gaussian.GaussianDiffusion(betas, loss_type="rescaled_mse")
  xt = plain.q_sample(x0, t // 2, noise)
  vb_plain = jax.jit(plain.training_losses)(out, x0, xt, t // 2, noise)["vb"]
  vb_scaled = jax.jit(scaled.training_losses)(out, x0, xt, t // 2,
                                               noise)["vb"]
  np.testing.assert_allclose(vb_scaled, 0.5 * vb_plain, rtol=1e-6)


def test_fixed_variances():
  betas = gaussian.get_beta_schedule("linear", T)
  _, abar = _abar()
  x = jnp.zeros((2, 1, 1, 1))
  t = np.array([0, 10])
  large = gaussian.GaussianDiffusion(betas, variance="fixed_large")
  small = gaussian.GaussianDiffusion(betas, variance="fixed_small")
  post1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
  post10 = betas[10] * (1 - abar[9]) / (1 - abar[10])
  np.testing.assert_allclose(
      large.p_mean_variance(x, x, t)["variance"].ravel(), [post1, betas[10]],
      rtol=1e-5)
  np.testing.assert_allclose(
      small.p_mean_variance(x, x, t)["variance"].ravel(), [post1, post10],
      rtol=1e-5)
  with pytest.raises(ValueError, match="2 output channels"):
    gaussian.GaussianDiffusion(betas).p_mean_variance(x, x, t)


def test_bad_names():
  with pytest.raises(ValueError, match="linear"):
    gaussian.get_beta_schedule("quadratic", 10)
  with pytest.raises(ValueError, match="fixed_large"):
    gaussian.GaussianDiffusion(np.full(3, 0.1), variance="learned")
  with pytest.raises(ValueError, match="rescaled_mse"):
    gaussian.GaussianDiffusion(np.full(3, 0.1), loss_type="l1")
