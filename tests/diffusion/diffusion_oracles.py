"""Analytic oracles for the diffusion tests.

Data are a mixture of Gaussians (one component = a Gaussian) in D dims,
reshaped to images ``(B, H, W, C)`` with ``H * W * C = D``. For a noisy
sample ``x = a x0 + s eps`` every posterior quantity is closed-form: with
``C_k = a^2 S_k + s^2 I`` and responsibilities r_k(x),

  E[eps | x] = sum_k r_k s C_k^{-1} (x - a mu_k),
  E[x0 | x]  = sum_k r_k (mu_k + a S_k C_k^{-1} (x - a mu_k)),

so the Bayes-optimal eps / velocity / score network for every objective and
interpolant is known exactly. For one Gaussian the probability-flow ODE is
also solvable: ``U^T (x - a mu) / sqrt(a^2 lambda + s^2)`` is constant along
it (U, lambda the eigenvectors/values of S), which gives exact references
for the convergence-order tests.

Written independently of jdit.diffusion: schedules and paths are recomputed
here in numpy.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Mixture:
  """A Gaussian mixture; ``shape`` is the per-example image shape."""
  weights: np.ndarray  # (K,)
  means: np.ndarray    # (K, D)
  covs: np.ndarray     # (K, D, D)
  shape: tuple

  def __post_init__(self):
    self.weights = np.asarray(self.weights, np.float64)
    self.means = np.asarray(self.means, np.float64)
    self.covs = np.asarray(self.covs, np.float64)
    lam, u = np.linalg.eigh(self.covs)
    self.lam, self.u = lam, u
    assert int(np.prod(self.shape)) == self.means.shape[1]

  @property
  def dim(self):
    return self.means.shape[1]

  def mean(self):
    return self.weights @ self.means

  def cov(self):
    m = self.mean()
    second = np.einsum("k,kij->ij", self.weights,
                       self.covs + np.einsum("ki,kj->kij", self.means,
                                             self.means))
    return second - np.outer(m, m)

  def sample(self, rng, n):
    comp = rng.choice(len(self.weights), size=n, p=self.weights)
    z = rng.standard_normal((n, self.dim))
    chol = np.linalg.cholesky(self.covs)
    x = self.means[comp] + np.einsum("nij,nj->ni", chol[comp], z)
    return x.reshape((n,) + tuple(self.shape))

  def posterior(self, x, a, s):
    """``(E[x0|x], E[eps|x])`` for ``x = a x0 + s eps``; jnp, float32.

    Args:
      x: ``(B, *shape)``.
      a, s: ``(B,)`` signal and noise scales.
    """
    b = x.shape[0]
    xf = x.reshape(b, -1).astype(jnp.float32)
    a = jnp.asarray(a, jnp.float32).reshape(b, 1)
    s = jnp.asarray(s, jnp.float32).reshape(b, 1)
    logits, x0s, epss = [], [], []
    for k in range(len(self.weights)):
      u = jnp.asarray(self.u[k], jnp.float32)
      lam = jnp.asarray(self.lam[k], jnp.float32)
      mu = jnp.asarray(self.means[k], jnp.float32)
      d = a * a * lam + s * s                       # (B, D)
      z = (xf - a * mu) @ u                         # (B, D) eigen-coords
      logits.append(np.log(self.weights[k]) - 0.5 * jnp.sum(z * z / d, -1)
                    - 0.5 * jnp.sum(jnp.log(d), -1))
      epss.append((s * z / d) @ u.T)
      x0s.append(mu + (a * lam * z / d) @ u.T)
    r = jax.nn.softmax(jnp.stack(logits, -1), axis=-1)  # (B, K)
    x0 = jnp.einsum("bk,kbd->bd", r, jnp.stack(x0s))
    eps = jnp.einsum("bk,kbd->bd", r, jnp.stack(epss))
    return x0.reshape(x.shape), eps.reshape(x.shape)

  def ode_map(self, x, a1, s1, a2, s2):
    """Exact probability-flow ODE map from (a1, s1) to (a2, s2), one Gaussian.

    Numpy float64; ``x`` is ``(B, *shape)``.
    """
    assert len(self.weights) == 1
    u, lam, mu = self.u[0], self.lam[0], self.means[0]
    b = x.shape[0]
    z = (np.asarray(x, np.float64).reshape(b, -1) - a1 * mu) @ u
    z = z * np.sqrt((a2 ** 2 * lam + s2 ** 2) / (a1 ** 2 * lam + s1 ** 2))
    return (a2 * mu + z @ u.T).reshape(x.shape)

  def x0_mean_np(self, x, a, s):
    """E[x0 | x] for one Gaussian, numpy float64."""
    u, lam, mu = self.u[0], self.lam[0], self.means[0]
    b = x.shape[0]
    z = (np.asarray(x, np.float64).reshape(b, -1) - a * mu) @ u
    return (mu + (a * lam * z / (a * a * lam + s * s)) @ u.T).reshape(x.shape)


def gaussian(mean, cov, shape):
  return Mixture([1.0], [mean], [cov], shape)


def diag_gaussian():
  """4-D diagonal Gaussian as (B, 2, 2, 1) images."""
  mean = np.array([0.5, -1.0, 0.0, 1.5])
  cov = np.diag([0.25, 1.0, 2.0, 0.5])
  return gaussian(mean, cov, (2, 2, 1))


def full_gaussian():
  """3-D Gaussian with a full covariance as (B, 1, 1, 3) images."""
  mean = np.array([1.0, -0.5, 0.25])
  l = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.4, 0.3, 0.5]])
  return gaussian(mean, l @ l.T, (1, 1, 3))


def two_modes():
  """2-D mixture of two well separated Gaussians as (B, 1, 1, 2)."""
  means = np.array([[-1.5, 0.5], [1.0, -0.5]])
  covs = np.array([[[0.1, 0.03], [0.03, 0.05]], [[0.2, 0.0], [0.0, 0.1]]])
  return Mixture([0.3, 0.7], means, covs, (1, 1, 2))


# Schedules recomputed independently of jdit.


def ddpm_log_abar(num_timesteps=1000):
  betas = np.linspace(1e-4 * 1000 / num_timesteps,
                      0.02 * 1000 / num_timesteps, num_timesteps)
  return np.cumsum(np.log1p(-betas))


def ddpm_model(data, learn_sigma, v=0.0, num_timesteps=1000):
  """Bayes-optimal eps network for ADM diffusion (t = model timestep)."""
  log_abar = jnp.asarray(ddpm_log_abar(num_timesteps), jnp.float32)
  grid = jnp.arange(num_timesteps, dtype=jnp.float32)

  def model_fn(x, t, y):
    del y
    la = jnp.interp(t, grid, log_abar)
    a, s = jnp.exp(0.5 * la), jnp.sqrt(-jnp.expm1(la))
    eps = data.posterior(x, a, s)[1]
    if learn_sigma:
      return jnp.concatenate([eps, jnp.full_like(eps, v)], -1)
    return eps

  return model_fn


def path_coefficients(path, t):
  """(alpha, sigma, alpha', sigma') in numpy/jnp, t = 1 noise."""
  if path == "linear":
    return 1 - t, t, -1.0 + 0 * t, 1.0 + 0 * t
  h = np.pi / 2
  return jnp.cos(h * t), jnp.sin(h * t), -h * jnp.sin(h * t), h * jnp.cos(h * t)


def flow_model(data, path, prediction, time_scale=1000.0, channels=None):
  """Bayes-optimal flow network: velocity, noise or score."""

  def model_fn(x, t_model, y):
    del y
    t = t_model / time_scale
    a, s, da, ds = path_coefficients(path, t)
    x0, eps = data.posterior(x, a, s)
    bc = lambda c: jnp.reshape(c, (-1,) + (1,) * (x.ndim - 1))
    if prediction == "velocity":
      out = bc(da) * x0 + bc(ds) * eps
    elif prediction == "noise":
      out = eps
    else:
      out = -eps / bc(s)
    if channels is not None:  # Learned-sigma layout: pad extra channels.
      out = jnp.concatenate([out, jnp.zeros_like(out)], -1)
    return out

  return model_fn


def moments(samples):
  """Sample mean and covariance of ``(N, *shape)`` as float64."""
  x = np.asarray(samples, np.float64).reshape(samples.shape[0], -1)
  return x.mean(0), np.cov(x, rowvar=False)


def slope(steps, errors):
  """Least-squares slope of log(error) against log(steps)."""
  return np.polyfit(np.log(steps), np.log(errors), 1)[0]


def sit_velocity_model(data, path, channels=None):
  """Bayes-optimal velocity network in SiT's own convention.

  SiT (Ma et al. 2024) runs time the other way: s = 1 is data, s = 0 noise,
  ``x_s = alpha_s x1 + sigma_s x0`` with x1 data and x0 noise (linear:
  alpha_s = s, sigma_s = 1 - s; GVP: alpha_s = sin(pi s / 2), sigma_s =
  cos(pi s / 2)); the network sees s itself and predicts
  ``E[alpha_s' x1 + sigma_s' x0 | x_s]`` (linear: data minus noise).
  """

  def model_fn(x, s, y):
    del y
    if path == "linear":
      a, sig, da, dsig = s, 1.0 - s, 1.0 + 0 * s, -1.0 + 0 * s
    else:
      h = np.pi / 2
      a, sig = jnp.sin(h * s), jnp.cos(h * s)
      da, dsig = h * jnp.cos(h * s), -h * jnp.sin(h * s)
    data_mean, noise_mean = data.posterior(x, a, sig)
    bc = lambda c: jnp.reshape(c, (-1,) + (1,) * (x.ndim - 1))
    out = bc(da) * data_mean + bc(dsig) * noise_mean
    if channels is not None:  # learned-sigma layout (SiT's 2C outputs)
      out = jnp.concatenate([out, jnp.zeros_like(out)], -1)
    return out

  return model_fn
