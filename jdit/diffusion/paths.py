"""Interpolant paths and prediction-target conversions for flow matching.

Every path writes a noisy sample as ``x_t = alpha(t) x0 + sigma(t) eps`` with
``t`` in ``[0, 1]``, ``t = 0`` the data and ``t = 1`` pure noise (the
rectified-flow / SD3 convention; SiT uses the mirror image ``t -> 1 - t``).

* ``"linear"`` (rectified flow, SiT ``Linear``): alpha = 1 - t, sigma = t.
* ``"gvp"`` (SiT ``GVP``): alpha = cos(pi t / 2), sigma = sin(pi t / 2).

The velocity is the time derivative of the path,
``u = alpha'(t) x0 + sigma'(t) eps`` (for ``"linear"``: ``eps - x0``), and a
network may predict its conditional mean (``"velocity"``), the conditional
mean of ``eps`` (``"noise"``) or the score ``grad log p_t(x) = -E[eps|x]/sigma``
(``"score"``). All conversions between them live here, as pure functions of
``(prediction, x, t)`` so that the loss and every sampler agree.

The conversions go through the pair (x0, eps): ``x = alpha x0 + sigma eps`` and
``v = alpha' x0 + sigma' eps`` form a 2x2 linear system whose determinant
``alpha sigma' - sigma alpha'`` is 1 (linear) or pi/2 (gvp), so velocity <->
(x0, eps) is never singular; only noise/score -> x0 divides by ``alpha`` and
needs ``t < 1`` (hence SiT's ``sample_eps``).
"""
import jax.numpy as jnp

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")


def check_path(path):
  if path not in PATHS:
    raise ValueError(f"Unknown flow path {path!r}; allowed: {PATHS}.")


def check_prediction(prediction):
  if prediction not in PREDICTIONS:
    raise ValueError(
        f"Unknown flow prediction {prediction!r}; allowed: {PREDICTIONS}.")


def _bcast(t, x):
  """Reshapes per-example ``t`` of shape (B,) (or a scalar) against ``x``."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def coefficients(path, t):
  """Returns ``(alpha, sigma, d_alpha, d_sigma)`` of ``path`` at time ``t``."""
  check_path(path)
  t = jnp.asarray(t, jnp.float32)
  if path == "linear":
    one = jnp.ones_like(t)
    return 1.0 - t, t, -one, one
  half_pi = jnp.pi / 2
  c, s = jnp.cos(half_pi * t), jnp.sin(half_pi * t)
  return c, s, -half_pi * s, half_pi * c


def interpolate(path, x0, eps, t):
  """Returns ``(x_t, u_t)``: the noisy sample and the target velocity."""
  a, s, da, ds = (_bcast(c, x0) for c in coefficients(path, t))
  return a * x0 + s * eps, da * x0 + ds * eps


def drift_var(path, t):
  """lambda(t) with ``v(x) = (alpha'/alpha) x - lambda(t) score(x)``.

  It is SiT's ``compute_drift()[1]``: ``sigma sigma' - sigma^2 alpha'/alpha``
  (>= 0), the diffusion coefficient of the "SBDM" SDE, and the likelihood
  weight of score matching. It diverges at t = 1 where alpha = 0.
  """
  a, s, da, ds = coefficients(path, t)
  return s * ds - s * s * da / a


def to_x0_eps(prediction, out, x, t, path):
  """Converts a network output to the implied ``(x0_hat, eps_hat)``."""
  check_prediction(prediction)
  a, s, da, ds = (_bcast(c, x) for c in coefficients(path, t))
  if prediction == "velocity":
    det = a * ds - s * da  # 1 (linear) or pi/2 (gvp): never zero.
    return (ds * x - s * out) / det, (a * out - da * x) / det
  eps = out if prediction == "noise" else -s * out
  return (x - s * eps) / a, eps


def from_x0_eps(prediction, x0, eps, t, path):
  """Expresses ``(x0, eps)`` as a target of type ``prediction``."""
  check_prediction(prediction)
  _, s, da, ds = (_bcast(c, x0) for c in coefficients(path, t))
  if prediction == "velocity":
    return da * x0 + ds * eps
  if prediction == "noise":
    return eps
  return -eps / s


def to_velocity(prediction, out, x, t, path):
  """The velocity ``dx/dt`` implied by a network output."""
  if prediction == "velocity":
    return out
  x0, eps = to_x0_eps(prediction, out, x, t, path)
  return from_x0_eps("velocity", x0, eps, t, path)


def to_eps(prediction, out, x, t, path):
  """The noise estimate ``E[eps | x_t]`` implied by a network output."""
  if prediction == "noise":
    return out
  return to_x0_eps(prediction, out, x, t, path)[1]


def to_score(prediction, out, x, t, path):
  """The score ``grad log p_t(x) = -E[eps|x_t] / sigma`` (needs t > 0)."""
  if prediction == "score":
    return out
  _, s, _, _ = coefficients(path, t)
  return -to_eps(prediction, out, x, t, path) / _bcast(s, x)


def to_x0(prediction, out, x, t, path):
  """The Tweedie estimate ``E[x0 | x_t]`` implied by a network output."""
  return to_x0_eps(prediction, out, x, t, path)[0]


def shift_time(t, shift):
  """SD3 resolution-dependent shift ``t' = s t / (1 + (s - 1) t)``.

  ``shift > 1`` moves time towards the noise end (t = 1); maps [0,1] onto
  itself monotonically, so it can warp both training times and sampler grids.
  """
  if shift == 1.0:
    return t
  return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(resolution, base_resolution=256):
  """SD3's resolution-dependent shift ``sqrt(m / n)`` for m vs n pixels.

  For square images that is the side ratio: 512 px against a 256 px base
  gives 2.0 (use it as ``time_shift`` / ``sample_shift``).
  """
  return float(resolution) / float(base_resolution)
