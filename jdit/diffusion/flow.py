"""The "flow" objective: flow matching / SiT stochastic interpolants.

Convention: ``x_t = alpha(t) x0 + sigma(t) eps`` with t in [0, 1], t = 0 data
and t = 1 noise (rectified flow: ``x_t = (1 - t) x0 + t eps``, velocity
target ``eps - x0``). See ``paths.py`` for the interpolants and the
velocity / noise / score conversions.

The network's time input is ``model_time(t) = model_time_scale * t`` (default
1000, the range DiT's timestep embedding was designed for). With
``model_time_flip`` the network works in SiT's reversed time s = 1 - t (t = 1
data): it sees ``model_time_scale * (1 - t)`` and a velocity network predicts
``dx/ds = -dx/dt`` (SiT's ``x1 - x0``, data minus noise), which is negated
here; noise and score predictions do not depend on the time direction. SiT
checkpoints: flip with scale 1.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion import objective
from jdit.diffusion import paths
from jdit.diffusion import samplers as integrators

TIME_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
DIFFUSION_FORMS = ("sigma", "sbdm", "constant", "linear", "decreasing",
                   "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler", "none")


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; allowed: {allowed}.")


def diffusion_coefficient(form, path, t, norm=1.0):
  """SiT's SDE diffusion forms w(t) in this module's time (t = 1 noise).

  "sigma": norm * sigma(t) (REPA's choice w = t for the linear path);
  "sbdm": norm * lambda(t), the score-based-model SDE (diverges at t = 1);
  "constant": norm; "linear": norm * t; "decreasing":
  0.25 (1 - norm cos(pi t))^2; "increasing-decreasing": norm sin(pi t)^2
  (SiT's forms with its time 1 - t substituted).
  """
  _check("SDE diffusion form", form, DIFFUSION_FORMS)
  t = jnp.asarray(t, jnp.float32)
  if form == "sigma":
    return norm * paths.coefficients(path, t)[1]
  if form == "sbdm":
    return norm * paths.drift_var(path, t)
  if form == "constant":
    return norm * jnp.ones_like(t)
  if form == "linear":
    return norm * t
  if form == "decreasing":
    return 0.25 * (1.0 - norm * jnp.cos(jnp.pi * t)) ** 2
  return norm * jnp.sin(jnp.pi * t) ** 2


def cosine_similarity(a, b, eps=1e-8):
  """Cosine between a and b along the last (channel) axis, each norm floored
  at eps (as torch's cosine_similarity). The floor is taken before the square
  root, so a zero vector (DiT's zero-initialised output layer at step 0)
  gives cosine 0 with finite gradients, not NaN."""
  def norm(x):
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))
  return jnp.sum(a * b, axis=-1) / (norm(a) * norm(b))


class Flow(objective.Objective):
  """Flow matching with a choice of interpolant and prediction target.

  Args:
    config: the ``config.diffusion.flow`` section (see ``default_config``).
    learn_sigma: the network may output 2C channels (DiT layout kept for
      checkpoint compatibility); only the first C are used.
  """
  name = "flow"
  samplers = ("euler", "heun", "sde")

  def __init__(self, config, *, learn_sigma):
    paths.check_path(config.path)
    paths.check_prediction(config.prediction)
    _check("time_sampling", config.time_sampling, TIME_SAMPLINGS)
    _check("loss_weight", config.loss_weight, LOSS_WEIGHTS)
    _check("SDE diffusion form", config.sde_diffusion, DIFFUSION_FORMS)
    _check("SDE last step", config.sde_last_step, LAST_STEPS)
    if config.time_shift <= 0 or config.sample_shift <= 0:
      raise ValueError("time_shift and sample_shift must be > 0.")
    if config.logit_std <= 0:
      raise ValueError(f"logit_std must be > 0, got {config.logit_std}.")
    if config.cosine_loss < 0 or (config.cosine_loss
                                  and config.prediction != "velocity"):
      raise ValueError(
          f"cosine_loss must be >= 0 and needs prediction 'velocity'; got "
          f"{config.cosine_loss} with prediction {config.prediction!r}.")
    self.config = config
    self.learn_sigma = learn_sigma
    self.path = config.path
    self.prediction = config.prediction
    # SiT's defaults: velocity models train and sample on all of [0, 1];
    # noise/score models need alpha > 0 and sigma > 0, so keep 1e-3 away.
    auto_eps = 0.0 if self.prediction == "velocity" else 1e-3
    self.train_eps = (auto_eps if config.train_eps is None
                      else float(config.train_eps))
    self.sample_eps = (auto_eps if config.sample_eps is None
                       else float(config.sample_eps))
    self.default_sampler = config.sampler
    self.default_steps = config.steps
    ode = {"shift": config.sample_shift, "sample_eps": self.sample_eps}
    self.sampler_options = {
        "euler": dict(ode),
        "heun": dict(ode),
        "sde": {**ode, "diffusion_form": config.sde_diffusion,
                "diffusion_norm": config.sde_diffusion_norm,
                "last_step": config.sde_last_step,
                "last_step_size": config.sde_last_step_size},
    }
    self.check_sampler()

  def model_time(self, t):
    """The network's ``t``: ``scale * t`` (or ``scale * (1 - t)`` flipped)."""
    t = jnp.asarray(t, jnp.float32)
    if self.config.model_time_flip:
      t = 1.0 - t
    return self.config.model_time_scale * t

  def prediction_of(self, out):
    """The network output in this module's convention (t = 1 noise).

    In reversed time a velocity points the other way: dx/ds = -dx/dt.
    """
    if self.config.model_time_flip and self.prediction == "velocity":
      return -out
    return out

  def x0_affine(self, t_norm):
    """Tweedie's x0 of the prediction, in the network's own sign (a flipped
    velocity network's output is -velocity)."""
    t = jnp.asarray(t_norm, jnp.float32)
    one, zero = jnp.ones_like(t), jnp.zeros_like(t)
    a = paths.to_x0(self.prediction, zero, one, t, self.path)
    b = paths.to_x0(self.prediction, one, zero, t, self.path)
    return a, self.prediction_of(b)

  def sample_time(self, key, batch):
    """Training times: uniform or logit-normal, then the SD3 shift."""
    if self.config.time_sampling == "uniform":
      t = jax.random.uniform(key, (batch,), jnp.float32)
    else:
      n = jax.random.normal(key, (batch,), jnp.float32)
      t = jax.nn.sigmoid(self.config.logit_mean + self.config.logit_std * n)
    t = paths.shift_time(t, self.config.time_shift)
    eps = self.train_eps
    return eps + (1.0 - 2.0 * eps) * t

  def loss_weight(self, t):
    """Per-example weight on the prediction-space MSE (see ``loss``)."""
    w = self.config.loss_weight
    if w == "none" or (w == "velocity" and self.prediction == "velocity"):
      return jnp.ones_like(t)
    _, s, _, _ = paths.coefficients(self.path, t)
    lam = paths.drift_var(self.path, t)
    if self.prediction == "velocity":  # likelihood: lambda * |score err|^2.
      return s * s / jnp.maximum(lam, 1e-12)
    if w == "velocity":
      return (lam / s) ** 2
    return lam / (s * s)

  def loss(self, model_fn, x0, key, y=None):
    """Flow-matching loss (SiT ``training_losses``).

    The per-example MSE is taken in the space of the prediction (velocity;
    eps for both "noise" and "score", the latter as ``|sigma s + eps|^2``
    like SiT) and weighted per ``config.loss_weight``: "none" (1),
    "velocity" (equivalent to the velocity MSE) or "likelihood" (lambda(t)
    times the score MSE, the maximum-likelihood weighting).

    With ``config.cosine_loss = w > 0`` (LightningDiT) the loss adds
    ``w * mean(1 - cos)``, the cosine taken per position across channels
    between the predicted and the true velocity: a term on the direction
    alone, which the MSE under-weights where velocities are small.

    Returns:
      ``(loss, metrics)``, batch means; metrics hold the unweighted
      prediction-space "mse" and, with a cosine term, "cosine" (mean
      1 - cos).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    c = x0.shape[-1]
    # `key`: one key, or (B,) per-example keys (see draw_time_and_noise).
    t, eps = objective.draw_time_and_noise(key, self.sample_time, x0.shape)
    x_t, u = paths.interpolate(self.path, x0, eps, t)
    out = model_fn(x_t, self.model_time(t), y).astype(jnp.float32)
    if out.shape[-1] not in (c, 2 * c):
      raise ValueError(
          f"Model output has {out.shape[-1]} channels; expected {c} or "
          f"{2 * c} (learned sigma, ignored by flow).")
    out = self.prediction_of(out[..., :c])
    if self.prediction == "velocity":
      err = out - u
    elif self.prediction == "noise":
      err = out - eps
    else:
      s = paths.coefficients(self.path, t)[1]
      err = out * s.reshape((-1,) + (1,) * (x0.ndim - 1)) + eps
    mse = jnp.mean(err ** 2, axis=tuple(range(1, x0.ndim)))
    loss = jnp.mean(self.loss_weight(t) * mse)
    metrics = {"mse": jnp.mean(mse)}
    if self.config.cosine_loss:
      metrics["cosine"] = jnp.mean(1.0 - cosine_similarity(out, u))
      loss = loss + self.config.cosine_loss * metrics["cosine"]
    return loss, metrics

  # Samplers.

  def is_stochastic(self, sampler, options):
    return sampler == "sde"

  def evaluations(self, sampler, steps):
    return 2 * int(steps) if sampler == "heun" else int(steps)

  def _time_grid(self, n, t_hi, t_lo, shift):
    """``n + 1`` times from ``t_hi`` down to ``t_lo``, warped by ``shift``."""
    u = paths.shift_time(np.linspace(1.0, 0.0, n + 1), shift)
    return t_lo + (t_hi - t_lo) * u

  def _sample(self, fn, state, noise, key, sampler, steps, options):
    b, c = noise.shape[0], noise.shape[-1]
    path, pred = self.path, self.prediction

    def output(x, t, state):
      tb = jnp.full((b,), t, jnp.float32)
      out, state = fn(x, self.model_time(tb), tb, state)
      return self.prediction_of(out[..., :c]), state

    def velocity(x, t, state):
      out, state = output(x, t, state)
      return paths.to_velocity(pred, out, x, t, path), state

    eps = float(options["sample_eps"])
    shift = float(options["shift"])
    if sampler in ("euler", "heun"):
      # Velocity models integrate all of [0, 1]; noise/score models stop
      # ``sample_eps`` short of both ends (SiT ``check_interval``).
      ts = self._time_grid(steps, 1.0 - eps, eps, shift)
      step = integrators.euler if sampler == "euler" else integrators.heun
      return step(velocity, noise, state, ts)
    return self._sde(output, velocity, noise, state, key, steps, eps, shift,
                     **{k: v for k, v in options.items()
                        if k not in ("sample_eps", "shift")})

  def _sde(self, output, velocity, noise, state, key, steps, eps, shift,
           diffusion_form, diffusion_norm, last_step, last_step_size):
    """Euler-Maruyama with SiT's diffusion forms and last-step options.

    ``steps`` counts network evaluations: with a last step, ``steps - 1``
    EM steps from t_hi down to ``last_step_size`` and one last step to 0;
    with ``last_step="none"``, ``steps`` EM steps down to t = 0.
    """
    _check("SDE diffusion form", diffusion_form, DIFFUSION_FORMS)
    _check("SDE last step", last_step, LAST_STEPS)
    path, pred = self.path, self.prediction
    # The SBDM coefficient diverges at t = 1: start 1e-3 short of it.
    t_hi = 1.0 - (max(eps, 1e-3) if diffusion_form == "sbdm" else eps)
    w = lambda t: diffusion_coefficient(diffusion_form, path, t,
                                        diffusion_norm)

    def drift(x, t, state):
      out, state = output(x, t, state)
      v = paths.to_velocity(pred, out, x, t, path)
      return v - w(t) * paths.to_score(pred, out, x, t, path), state

    if last_step == "none":
      ts = self._time_grid(steps, t_hi, 0.0, shift)
      return integrators.euler_maruyama(drift, w, noise, state, ts, key)
    if not 0.0 < last_step_size < t_hi:
      raise ValueError(
          f"last_step_size must be in (0, {t_hi}), got {last_step_size}.")
    ts = self._time_grid(steps - 1, t_hi, last_step_size, shift)
    x, state = integrators.euler_maruyama(drift, w, noise, state, ts, key)
    t = float(ts[-1])
    if last_step == "mean":
      d, state = drift(x, t, state)
      return x - t * d, state
    if last_step == "euler":
      v, state = velocity(x, t, state)
      return x - t * v, state
    out, state = output(x, t, state)
    return paths.to_x0(pred, out, x, t, path), state
