"""The "ddpm" objective: ADM/DiT Gaussian diffusion and its samplers.

Time conventions:
  * Training draws integer timesteps t ~ U{0, ..., T-1} (T = num_timesteps,
    1000 in DiT) and the network sees ``model_time(t) = float(t)``.
  * Respaced samplers (ddpm, ddim) call the network with the ORIGINAL
    timestep of each kept step (DiT ``rescale_timesteps=False``).
  * dpm++ runs on a continuous grid of fractional timesteps in [0, T-1]
    (``log abar`` interpolated linearly between integers, as in
    DPM-Solver's discrete noise schedule), so the network may see
    non-integer ``t``; its sinusoidal embedding is continuous.
  * Guidance intervals use normalised time ``t / T`` (t = T is noise).
"""
import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion import gaussian
from jdit.diffusion import objective
from jdit.diffusion import respace

SPACINGS = ("adm", "ddim")
DPM_GRIDS = ("logsnr", "time")


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; allowed: {allowed}.")


class DDPM(objective.Objective):
  """ADM Gaussian diffusion with epsilon prediction.

  Args:
    config: the ``config.diffusion.ddpm`` section (see ``default_config``).
    learn_sigma: whether the network outputs ``[eps, v]`` (2C channels) with a
      learned-range variance; otherwise the variance is fixed (large or
      small per ``config.sigma_small``).
  """
  name = "ddpm"
  samplers = ("ddpm", "ddim", "dpm++")

  def __init__(self, config, *, learn_sigma):
    _check("spacing", config.spacing, SPACINGS)
    _check("dpm_grid", config.dpm_grid, DPM_GRIDS)
    if config.num_timesteps < 1:
      raise ValueError(
          f"num_timesteps must be >= 1, got {config.num_timesteps}.")
    self.config = config
    self.learn_sigma = learn_sigma
    if learn_sigma:
      variance = "learned_range"
    else:
      variance = "fixed_small" if config.sigma_small else "fixed_large"
    self.diffusion = gaussian.GaussianDiffusion(
        gaussian.get_beta_schedule(config.beta_schedule, config.num_timesteps),
        variance=variance, loss_type=config.loss_type,
        clip_denoised=config.clip_denoised,
        min_snr_gamma=config.min_snr_gamma)
    self.num_timesteps = config.num_timesteps
    self.default_sampler = config.sampler
    self.default_steps = config.steps
    self.sampler_options = {
        "ddpm": {"spacing": config.spacing,
                 "clip_denoised": config.clip_denoised},
        "ddim": {"spacing": config.spacing,
                 "clip_denoised": config.clip_denoised,
                 "eta": config.ddim_eta},
        "dpm++": {"grid": config.dpm_grid,
                  "clip_denoised": config.clip_denoised},
    }
    self.check_sampler()  # Validates the configured default sampler/steps.

  def model_time(self, t):
    """The network's ``t``: the (base-process) timestep as float32."""
    return jnp.asarray(t, jnp.float32)

  def normalized_time(self, t):
    """Timestep -> [0, 1] for guidance intervals (1 = noise)."""
    return jnp.asarray(t, jnp.float32) / self.num_timesteps

  def x0_affine(self, t_norm):
    """x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) at timestep t_norm * T
    (fractional ones interpolated as dpm++ does)."""
    log_abar = jnp.interp(jnp.asarray(t_norm, jnp.float32) * self.num_timesteps,
                          jnp.arange(self.num_timesteps, dtype=jnp.float32),
                          jnp.asarray(np.log(self.diffusion.alphas_cumprod),
                                      jnp.float32))
    return jnp.exp(-0.5 * log_abar), -jnp.sqrt(jnp.expm1(-log_abar))

  def loss(self, model_fn, x0, key, y=None):
    """DiT training loss at uniformly drawn timesteps.

    Returns:
      ``(loss, metrics)``: the batch mean of the per-example loss and the
      batch means of its terms ("mse", plus "vb" with learned sigma).
    """
    x0 = jnp.asarray(x0, jnp.float32)
    # `key`: one key, or (B,) per-example keys (see draw_time_and_noise).
    t, noise = objective.draw_time_and_noise(
        key, lambda k, n: jax.random.randint(k, (n,), 0, self.num_timesteps),
        x0.shape)
    x_t = self.diffusion.q_sample(x0, t, noise)
    out = model_fn(x_t, self.model_time(t), y).astype(jnp.float32)
    terms = self.diffusion.training_losses(out, x0, x_t, t, noise)
    metrics = {k: jnp.mean(v) for k, v in terms.items() if k != "loss"}
    return jnp.mean(terms["loss"]), metrics

  # Samplers.

  def is_stochastic(self, sampler, options):
    return sampler == "ddpm" or (sampler == "ddim" and options["eta"] != 0)

  def respaced(self, steps, spacing, clip_denoised):
    """The respaced process used by ddpm/ddim for ``steps`` steps."""
    _check("spacing", spacing, SPACINGS)
    rule = str(steps) if spacing == "adm" else f"ddim{steps}"
    use = respace.space_timesteps(self.num_timesteps, rule)
    diffusion, tmap = respace.respace(self.diffusion, use)
    diffusion.clip_denoised = bool(clip_denoised)
    return diffusion, tmap

  def _sample(self, fn, state, noise, key, sampler, steps, options):
    if sampler == "dpm++":
      return self._dpm_solver(fn, state, noise, steps, **options)
    diffusion, tmap = self.respaced(steps, options["spacing"],
                                    options["clip_denoised"])
    n = len(tmap)
    b = noise.shape[0]
    # Per-step constants, reversed (the loop runs from noise to data).
    idx = np.arange(n)[::-1]
    model_t = jnp.asarray(tmap[idx], jnp.float32)
    keys = jax.random.split(key, n)
    stochastic = self.is_stochastic(sampler, options)
    if sampler == "ddim":
      eta = float(options["eta"])
      abar = diffusion.alphas_cumprod[idx]
      abar_prev = diffusion.alphas_cumprod_prev[idx]
      sig = (eta * np.sqrt((1 - abar_prev) / (1 - abar))
             * np.sqrt(1 - abar / abar_prev))
      consts = (jnp.asarray(np.sqrt(abar_prev), jnp.float32),
                jnp.asarray(np.sqrt(np.maximum(1 - abar_prev - sig ** 2, 0)),
                            jnp.float32),
                jnp.asarray(sig, jnp.float32))
    else:
      consts = (jnp.zeros(n),) * 3

    def body(carry, xs):
      x, state = carry
      i, t_model, k, (c_x0, c_eps, c_noise) = xs
      t = jnp.full((b,), i, jnp.int32)
      tm = jnp.full((b,), t_model)
      out, state = fn(x, tm, self.normalized_time(tm), state)
      p = diffusion.p_mean_variance(out, x, t)
      if stochastic:  # No noise at the last step (i = 0), as in ADM.
        z = jax.random.normal(k, x.shape, jnp.float32)
        z = z * (i > 0).astype(jnp.float32)
      if sampler == "ddpm":
        x = p["mean"] + jnp.exp(0.5 * p["log_variance"]) * z
        return (x, state), None
      # ADM re-derives eps from the (possibly clipped) x0 prediction.
      eps = diffusion.eps_from_xstart(x, t, p["pred_xstart"])
      x = c_x0 * p["pred_xstart"] + c_eps * eps
      return (x + c_noise * z if stochastic else x, state), None

    xs = (jnp.asarray(idx, jnp.int32), model_t, keys, consts)
    (x, state), _ = jax.lax.scan(body, (noise, state), xs)
    return x, state

  def dpm_grid(self, steps, grid):
    """Fractional timesteps for dpm++: ``steps`` points from T-1 down to 0.

    "time": uniform in t. "logsnr": uniform in lambda = log(alpha / sigma)
    (DPM-Solver's recommended grid), inverted exactly through the
    piecewise-linear ``log abar`` interpolation.
    """
    _check("dpm_grid", grid, DPM_GRIDS)
    t_max = self.num_timesteps - 1
    if steps == 1:
      return np.array([float(t_max)])
    if grid == "time":
      return np.linspace(t_max, 0.0, steps)
    log_abar = np.log(self.diffusion.alphas_cumprod)
    lam = self._lambda(np.array([t_max, 0.0]))
    lams = np.linspace(lam[0], lam[1], steps)
    target = -np.logaddexp(0.0, -2.0 * lams)  # log sigmoid(2 lambda)
    # log_abar decreases with t: interpolate on the reversed arrays.
    ts = np.interp(target, log_abar[::-1], np.arange(t_max + 1.0)[::-1])
    ts[0], ts[-1] = t_max, 0.0
    return ts

  def _log_abar(self, t):
    """Continuous ``log abar(t)`` by linear interpolation (float64)."""
    log_abar = np.log(self.diffusion.alphas_cumprod)
    return np.interp(t, np.arange(len(log_abar), dtype=np.float64), log_abar)

  def _lambda(self, t):
    la = self._log_abar(t)
    return 0.5 * la - 0.5 * np.log(-np.expm1(la))

  def _dpm_solver(self, fn, state, noise, steps, grid, clip_denoised):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep.

    The network is evaluated once at each of the ``steps`` grid times; the
    state moves t_i -> t_{i+1} with the second-order multistep update (first
    order on the first step) and the result is the x0 prediction at the last
    grid time (t = 0), i.e. the final step goes to sigma = 0 at first order.
    """
    ts = self.dpm_grid(steps, grid)
    la = self._log_abar(ts)
    alpha, sigma = np.exp(0.5 * la), np.sqrt(-np.expm1(la))
    lam = np.log(alpha) - np.log(sigma)
    n = len(ts)
    # Update x <- a x + b (w_cur x0_i + w_prev x0_{i-1}); dummy last entry.
    a, bb = np.ones(n), np.zeros(n)
    w_cur, w_prev = np.ones(n), np.zeros(n)
    for i in range(n - 1):
      h = lam[i + 1] - lam[i]
      a[i] = sigma[i + 1] / sigma[i]
      bb[i] = -alpha[i + 1] * np.expm1(-h)
      if i > 0:
        r = (lam[i] - lam[i - 1]) / h
        w_cur[i], w_prev[i] = 1 + 1 / (2 * r), -1 / (2 * r)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    b = noise.shape[0]
    c = noise.shape[-1]

    def body(carry, xs):
      x, x0_prev, state = carry
      t, al, si, a_i, b_i, wc, wp = xs
      tm = jnp.full((b,), t)
      eps, state = fn(x, tm, self.normalized_time(tm), state)
      eps = eps[..., :c]
      x0 = (x - si * eps) / al
      if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
      x = a_i * x + b_i * (wc * x0 + wp * x0_prev)
      return (x, x0, state), None

    xs = tuple(f32(v) for v in (ts, alpha, sigma, a, bb, w_cur, w_prev))
    (_, x0, state), _ = jax.lax.scan(
        body, (noise, jnp.zeros_like(noise), state), xs)
    return x0, state
