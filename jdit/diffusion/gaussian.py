"""ADM Gaussian diffusion numerics (a JAX port of the DiT / ADM formulas).

Follows facebookresearch/DiT ``diffusion/gaussian_diffusion.py`` (itself from
openai/guided-diffusion and improved-diffusion): epsilon prediction, a fixed or
learned-range variance, the hybrid MSE + VLB loss, and the discretized
Gaussian decoder likelihood at t = 0. Schedules are computed once in numpy
float64 (as ADM does) and cast to float32 when gathered.

Layout is channels-last: ``x`` is ``(B, H, W, C)``; with learned sigma the
network output is ``(B, H, W, 2C)`` = ``[eps, v]`` with ``v`` in [-1, 1]
interpolating the log variance between the posterior variance (v = -1) and
beta_t (v = +1).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")
VARIANCES = ("learned_range", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def get_beta_schedule(name, num_timesteps):
  """ADM named schedules; "linear" is scaled so that T=1000 gives 1e-4..0.02."""
  if name == "linear":
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps,
                       dtype=np.float64)
  if name in ("cosine", "squaredcos_cap_v2"):  # ADM's name for it.
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps),
                         0.999) for i in range(num_timesteps)], np.float64)
  raise ValueError(
      f"Unknown beta schedule {name!r}; allowed: {BETA_SCHEDULES}.")


def mean_flat(x):
  """Mean over all non-batch axes."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by ADM."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi)
                               * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood of data in [-1, 1] quantised to 256 bins, elementwise.

  The edge bins extend to -inf / +inf (ADM's decoder for t = 0).
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
  """Discrete-time Gaussian diffusion with T steps (ADM semantics).

  Args:
    betas: float64 array (T,) of noise variances.
    variance: one of VARIANCES; "learned_range" expects 2C output channels.
    loss_type: one of LOSS_TYPES. DiT's ``create_diffusion`` defaults give
      "mse": loss = MSE(eps) + vb, vb NOT rescaled (the num_timesteps/1000
      factor only applies to "rescaled_mse").
    clip_denoised: clamp predicted x0 to [-1, 1] (pixel models); DiT samples
      latents with clip_denoised=False.
    min_snr_gamma: gamma > 0 weighs the eps MSE of timestep t by
      min(SNR_t, gamma) / SNR_t (Min-SNR-gamma, Hang et al. 2023, who use
      5): the nearly clean timesteps, whose high SNR makes them dominate the
      gradients of the plain MSE, are down-weighted. 0 = off (ADM/DiT).
  """

  def __init__(self, betas, *, variance="learned_range", loss_type="mse",
               clip_denoised=False, min_snr_gamma=0.0):
    if variance not in VARIANCES:
      raise ValueError(f"Unknown variance {variance!r}; allowed: {VARIANCES}.")
    if loss_type not in LOSS_TYPES:
      raise ValueError(
          f"Unknown loss_type {loss_type!r}; allowed: {LOSS_TYPES}.")
    if not min_snr_gamma >= 0 or (min_snr_gamma
                                  and loss_type not in ("mse",
                                                        "rescaled_mse")):
      raise ValueError(f"min_snr_gamma must be >= 0 and weighs an MSE "
                       f"loss; got {min_snr_gamma} with loss_type "
                       f"{loss_type!r}.")
    self.min_snr_gamma = float(min_snr_gamma)
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
      raise ValueError("betas must be a 1-D array in (0, 1].")
    self.variance = variance
    self.loss_type = loss_type
    self.clip_denoised = clip_denoised
    self.num_timesteps = len(betas)
    self.betas = betas
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev
    self.sqrt_alphas_cumprod = np.sqrt(acp)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
    self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    # The posterior variance is 0 at t = 0; ADM clips its log there to the
    # t = 1 value so that the learned-range interpolation stays finite.
    if len(betas) > 1:
      self.posterior_log_variance_clipped = np.log(
          np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    else:
      # A 1-step (respaced) process only has the t = 0 step, which adds no
      # noise; use log beta so the learned-range interpolation stays finite.
      self.posterior_log_variance_clipped = np.log(betas)
    self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
    self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
    self.log_betas = np.log(betas)
    # Fixed-large uses beta_t but the t = 0 entry is the posterior variance
    # at t = 1, to get a better decoder log-likelihood (ADM).
    self.fixed_large_log_variance = np.log(np.append(
        self.posterior_variance[1] if len(betas) > 1 else betas[0],
        betas[1:]))

  def _gather(self, name, t, x):
    """``self.<name>[t]`` as float32 shaped to broadcast against ``x``."""
    arr = jnp.asarray(getattr(self, name), jnp.float32)
    out = arr[jnp.asarray(t, jnp.int32)]
    return out.reshape(out.shape + (1,) * (x.ndim - out.ndim))

  def q_mean_variance(self, x0, t):
    """Mean, variance and log-variance of q(x_t | x_0)."""
    mean = self._gather("sqrt_alphas_cumprod", t, x0) * x0
    var = 1.0 - self._gather("alphas_cumprod", t, x0)
    return mean, var, jnp.log(var)

  def q_sample(self, x0, t, noise):
    """Draws x_t ~ q(x_t | x_0) with the given standard-normal ``noise``."""
    return (self._gather("sqrt_alphas_cumprod", t, x0) * x0
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

  def q_posterior_mean_variance(self, x0, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = (self._gather("posterior_mean_coef1", t, x_t) * x0
            + self._gather("posterior_mean_coef2", t, x_t) * x_t)
    var = self._gather("posterior_variance", t, x_t)
    log_var = self._gather("posterior_log_variance_clipped", t, x_t)
    return mean, var, log_var

  def pred_xstart_from_eps(self, x_t, t, eps):
    return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

  def eps_from_xstart(self, x_t, t, x0):
    return ((self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
            / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t))

  def split_output(self, model_out, channels):
    """Splits a network output into (eps, v or None)."""
    if self.variance == "learned_range":
      if model_out.shape[-1] != 2 * channels:
        raise ValueError(
            f"Learned sigma needs {2 * channels} output channels (eps, v), "
            f"got {model_out.shape[-1]}.")
      return model_out[..., :channels], model_out[..., channels:]
    if model_out.shape[-1] != channels:
      raise ValueError(
          f"Fixed variance needs {channels} output channels, got "
          f"{model_out.shape[-1]}.")
    return model_out, None

  def p_mean_variance(self, model_out, x_t, t, clip_denoised=None):
    """Parameters of p(x_{t-1} | x_t) from a network output.

    Args:
      model_out: ``(B, H, W, C)`` eps or ``(B, H, W, 2C)`` [eps, v].
      x_t: ``(B, H, W, C)``.
      t: ``(B,)`` int timesteps of THIS process (respaced index if respaced).
      clip_denoised: overrides the constructor's setting (training never
        clips, as in ADM).

    Returns:
      dict with "mean", "variance", "log_variance", "pred_xstart", "eps".
    """
    eps, v = self.split_output(model_out, x_t.shape[-1])
    if self.variance == "learned_range":
      min_log = self._gather("posterior_log_variance_clipped", t, x_t)
      max_log = self._gather("log_betas", t, x_t)
      frac = (v + 1.0) / 2.0
      log_var = frac * max_log + (1.0 - frac) * min_log
    elif self.variance == "fixed_large":
      log_var = jnp.broadcast_to(
          self._gather("fixed_large_log_variance", t, x_t), x_t.shape)
    else:
      log_var = jnp.broadcast_to(
          self._gather("posterior_log_variance_clipped", t, x_t), x_t.shape)
    pred_xstart = self.pred_xstart_from_eps(x_t, t, eps)
    if clip_denoised is None:
      clip_denoised = self.clip_denoised
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
      eps = self.eps_from_xstart(x_t, t, pred_xstart)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return {"mean": mean, "variance": jnp.exp(log_var),
            "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

  def vb_terms_bpd(self, model_out, x0, x_t, t):
    """Per-example VLB term in bits/dim: KL for t > 0, decoder NLL at t = 0."""
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
    out = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
    kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
    kl = mean_flat(kl) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(
        x0, out["mean"], 0.5 * out["log_variance"])
    nll = mean_flat(nll) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, nll, kl), out

  def training_losses(self, model_out, x0, x_t, t, noise):
    """Per-example loss terms for a network output at (x_t, t).

    With learned sigma and an MSE loss this is DiT's hybrid loss: the VLB term
    sees the eps half through ``stop_gradient`` so that it trains only the
    variance (improved-diffusion's "frozen_out"), and loss = mse + vb.

    Returns:
      dict of ``(B,)`` arrays: "loss", "mse" (MSE losses) and "vb" (when the
      variance is learned or for KL losses).
    """
    channels = x0.shape[-1]
    terms = {}
    if self.loss_type in ("kl", "rescaled_kl"):
      vb, _ = self.vb_terms_bpd(model_out, x0, x_t, t)
      if self.loss_type == "rescaled_kl":
        vb = vb * self.num_timesteps
      terms["vb"] = vb
      terms["loss"] = vb
      return terms
    eps, v = self.split_output(model_out, channels)
    terms["mse"] = mean_flat((noise - eps) ** 2)
    mse = terms["mse"] * self.mse_weight(t) if self.min_snr_gamma else (
        terms["mse"])
    if v is not None:
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
      vb, _ = self.vb_terms_bpd(frozen, x0, x_t, t)
      if self.loss_type == "rescaled_mse":
        # improved-diffusion: divide by 1000 as in the paper, without
        # affecting the vb scale for other T.
        vb = vb * (self.num_timesteps / 1000.0)
      terms["vb"] = vb
      terms["loss"] = mse + vb
    else:
      terms["loss"] = mse
    return terms

  def mse_weight(self, t):
    """Min-SNR-gamma's weight of the eps MSE at integer timesteps t."""
    snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
    weight = np.minimum(snr, self.min_snr_gamma) / snr
    return jnp.asarray(weight, jnp.float32)[t]
