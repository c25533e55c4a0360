"""Diffusion objectives, samplers and classifier-free guidance.

Usage::

  objective = jdit.diffusion.create(config.objective, config.diffusion,
                                    learn_sigma=True)
  loss, metrics = objective.loss(model_fn, x0, key, y)
  x = objective.sample(model_fn, noise, key, y=y, sampler="ddpm", steps=250,
                       guidance=jdit.diffusion.Guidance(scale=1.5))

``model_fn(x_t, t_model, y) -> (B, H, W, C_out)`` is the network; its time
input is ``objective.model_time(t)``: for "ddpm" the timestep as a float in
[0, num_timesteps); for "flow" ``model_time_scale * t`` with t in [0, 1]
(t = 1 noise).
"""
import ml_collections
from ml_collections import config_dict

from jdit.diffusion import ddpm as _ddpm
from jdit.diffusion import flow as _flow
from jdit.diffusion.guidance import Guidance
from jdit.diffusion.objective import Objective

OBJECTIVES = ("ddpm", "flow")

__all__ = ["OBJECTIVES", "Guidance", "Objective", "create", "default_config"]


def default_config() -> ml_collections.ConfigDict:
  """The ``config.diffusion`` section: one sub-section per objective."""
  c = ml_collections.ConfigDict()

  # ADM / DiT Gaussian diffusion (defaults = DiT's create_diffusion).
  c.ddpm = d = ml_collections.ConfigDict()
  d.num_timesteps = 1000      # T of the training process.
  d.beta_schedule = "linear"  # "linear" (1e-4..0.02 at T=1000) | "cosine".
  # "mse" (DiT: MSE(eps) + unscaled VB when sigma is learned) |
  # "rescaled_mse" (VB * T/1000) | "kl" | "rescaled_kl" (VB only).
  d.loss_type = "mse"
  d.min_snr_gamma = 0.0       # > 0: weigh the eps MSE by min(SNR, gamma) /
  #                             SNR (Min-SNR-gamma; the paper's gamma: 5).
  d.sigma_small = False       # Fixed variance (learn_sigma=False): posterior
  #                             variance (small) instead of beta_t (large).
  d.clip_denoised = False     # Clamp predicted x0 to [-1, 1] when sampling
  #                             (True for pixel models; DiT latents: False).
  d.spacing = "adm"           # Respacing for ddpm/ddim: "adm" keeps
  #                             space_timesteps(T, str(steps)); "ddim" keeps
  #                             space_timesteps(T, f"ddim{steps}").
  d.ddim_eta = 0.0            # DDIM stochasticity (0 = deterministic).
  d.dpm_grid = "logsnr"       # dpm++ grid: "logsnr" (uniform in log SNR) |
  #                             "time" (uniform in t).
  d.sampler = "ddpm"          # Default sampler: "ddpm" | "ddim" | "dpm++".
  d.steps = 250               # Default number of sampling steps (DiT: 250).

  # Flow matching / SiT interpolants (t = 0 data, t = 1 noise).
  c.flow = f = ml_collections.ConfigDict()
  f.path = "linear"           # "linear" (x_t = (1-t) x0 + t eps) | "gvp".
  f.prediction = "velocity"   # Network target: "velocity" | "noise" | "score".
  f.loss_weight = "none"      # "none" | "velocity" | "likelihood" (SiT).
  f.cosine_loss = 0.0         # Weight of a direction term, mean over
  #                             positions of 1 - cos(predicted, true velocity)
  #                             across channels (LightningDiT: 1.0); velocity
  #                             prediction only.
  f.time_sampling = "uniform"  # Training t: "uniform" | "logit_normal".
  f.logit_mean = 0.0          # Logit-normal location (SD3: 0.0).
  f.logit_std = 1.0           # Logit-normal scale (SD3: 1.0).
  f.time_shift = 1.0          # SD3 shift of training t: s t / (1 + (s-1) t);
  #                             > 1 spends more time near noise (SD3 uses
  #                             paths.resolution_shift(res) = res / 256).
  # Keep t in [eps, 1 - eps]; None = SiT's default (0 for velocity, 1e-3 for
  # noise/score predictions).
  f.train_eps = config_dict.placeholder(float)
  f.sample_eps = config_dict.placeholder(float)
  f.model_time_scale = 1000.0  # The network sees scale * t ...
  f.model_time_flip = False    # ... or SiT's reversed time: it sees
  #                             scale * (1 - t) and predicts velocities
  #                             d x / d(1 - t) (SiT checkpoints: True, scale 1).
  f.sample_shift = 1.0        # Same shift applied to the sampler time grid.
  # SDE diffusion w(t): "sigma" (REPA) | "sbdm" (SiT default) | "constant" |
  # "linear" | "decreasing" | "increasing-decreasing".
  f.sde_diffusion = "sigma"
  f.sde_diffusion_norm = 1.0  # Multiplier of w(t).
  f.sde_last_step = "mean"    # "mean" | "tweedie" | "euler" | "none".
  f.sde_last_step_size = 0.04  # Size of that last step (SiT: 0.04).
  f.sampler = "euler"         # Default sampler: "euler" | "heun" | "sde".
  f.steps = 50                # Default number of steps (network calls per
  #                             sample: euler/sde 1 per step, heun 2).
  return c


def create(objective: str, config: ml_collections.ConfigDict, *,
           learn_sigma: bool) -> Objective:
  """Builds an objective from the ``config.diffusion`` section.

  Args:
    objective: one of OBJECTIVES.
    config: a ConfigDict shaped like ``default_config()`` (missing
      sub-sections fall back to the defaults).
    learn_sigma: whether the network outputs 2C channels ([eps, v]).

  Returns:
    An Objective.

  Raises:
    ValueError: unknown objective or bad options (naming the allowed values).
  """
  if objective not in OBJECTIVES:
    raise ValueError(
        f"Unknown objective {objective!r}; allowed: {OBJECTIVES}.")
  section = default_config()[objective]
  if config is not None and objective in config:
    given = config[objective]
    unknown = sorted(set(given.keys()) - set(section.keys()))
    if unknown:
      raise ValueError(
          f"Unknown diffusion.{objective} options {unknown}; allowed: "
          f"{tuple(section.keys())}.")
    for k in given.keys():  # Item-wise: update() rejects placeholders.
      section[k] = given[k]
  if objective == "ddpm":
    return _ddpm.DDPM(section, learn_sigma=learn_sigma)
  return _flow.Flow(section, learn_sigma=learn_sigma)
