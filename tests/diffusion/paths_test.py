"""Interpolants and prediction conversions (jdit.diffusion.paths)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.diffusion import paths


@pytest.mark.parametrize("path", paths.PATHS)
def test_coefficients_and_derivatives(path):
  t = np.linspace(0.0, 1.0, 11)
  a, s, da, ds = (np.asarray(c) for c in paths.coefficients(path, t))
  if path == "linear":
    np.testing.assert_allclose(a, 1 - t, atol=1e-7)
    np.testing.assert_allclose(s, t, atol=1e-7)
  else:
    np.testing.assert_allclose(a, np.cos(np.pi * t / 2), atol=1e-6)
    np.testing.assert_allclose(s, np.sin(np.pi * t / 2), atol=1e-6)
  # t = 0 data, t = 1 noise for both.
  np.testing.assert_allclose([a[0], s[0], a[-1], s[-1]], [1, 0, 0, 1],
                             atol=1e-6)
  # Derivatives by autodiff of the same functions.
  grad_a = jax.vmap(jax.grad(lambda u: paths.coefficients(path, u)[0]))
  grad_s = jax.vmap(jax.grad(lambda u: paths.coefficients(path, u)[1]))
  np.testing.assert_allclose(da, grad_a(jnp.asarray(t)), atol=1e-5)
  np.testing.assert_allclose(ds, grad_s(jnp.asarray(t)), atol=1e-5)


@pytest.mark.parametrize("path", paths.PATHS)
@pytest.mark.parametrize("prediction", paths.PREDICTIONS)
def test_conversions_round_trip(path, prediction):
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((5, 2, 2, 3)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.asarray([0.05, 0.3, 0.5, 0.8, 0.97])
  x, u = paths.interpolate(path, x0, eps, t)
  out = paths.from_x0_eps(prediction, x0, eps, t, path)
  x0_hat, eps_hat = paths.to_x0_eps(prediction, out, x, t, path)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-4)
  np.testing.assert_allclose(paths.to_velocity(prediction, out, x, t, path),
                             u, atol=2e-4)
  s = np.asarray(paths.coefficients(path, t)[1]).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(paths.to_score(prediction, out, x, t, path),
                             -np.asarray(eps) / s, rtol=1e-3, atol=1e-3)


def test_linear_is_rectified_flow():
  x0, eps = jnp.ones((1, 1, 1, 1)), 3 * jnp.ones((1, 1, 1, 1))
  x, u = paths.interpolate("linear", x0, eps, jnp.asarray([0.25]))
  np.testing.assert_allclose(x.ravel(), [0.75 + 0.75])
  np.testing.assert_allclose(u.ravel(), [2.0])  # eps - x0
  # Velocity -> (x0, eps) is non-singular at both ends.
  for t in (0.0, 1.0):
    tt = jnp.asarray([t])
    x, u = paths.interpolate("linear", x0, eps, tt)
    x0_hat, eps_hat = paths.to_x0_eps("velocity", u, x, tt, "linear")
    np.testing.assert_allclose([x0_hat.ravel()[0], eps_hat.ravel()[0]],
                               [1.0, 3.0], atol=1e-6)


@pytest.mark.parametrize("path", paths.PATHS)
def test_drift_var_is_score_coefficient(path):
  """v(x) = (alpha'/alpha) x - lambda score(x) for Gaussian data N(0, c)."""
  c, t = 0.7, np.array([0.1, 0.5, 0.9])
  a, s, da, ds = (np.asarray(v, np.float64) for v in
                  paths.coefficients(path, t))
  x = 1.3
  var = a ** 2 * c + s ** 2
  # E[u | x] by Gaussian conditioning; score = -x / var.
  v = (a * da * c + s * ds) / var * x
  lam = np.asarray(paths.drift_var(path, t), np.float64)
  np.testing.assert_allclose(v, da / a * x - lam * (-x / var), rtol=1e-4)


def test_shift_time():
  t = np.linspace(0, 1, 5)
  np.testing.assert_allclose(paths.shift_time(t, 3.0), 3 * t / (1 + 2 * t))
  assert paths.shift_time(t, 1.0) is t
  assert np.all(np.diff(paths.shift_time(t, 0.3)) > 0)


def test_bad_names():
  with pytest.raises(ValueError, match=r"\('linear', 'gvp'\)"):
    paths.coefficients("vp", 0.5)
  with pytest.raises(ValueError, match="velocity"):
    paths.to_velocity("x0", None, None, 0.5, "linear")
