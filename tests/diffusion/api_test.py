"""The public interface: config, create(), Objective attributes, bad input."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdit import diffusion


def test_default_config_and_objectives():
  cfg = diffusion.default_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert set(cfg.keys()) == set(diffusion.OBJECTIVES) == {"ddpm", "flow"}
  ddpm = diffusion.create("ddpm", cfg, learn_sigma=True)
  assert (ddpm.name, ddpm.samplers) == ("ddpm", ("ddpm", "ddim", "dpm++"))
  assert (ddpm.default_sampler, ddpm.default_steps) == ("ddpm", 250)
  flow = diffusion.create("flow", cfg, learn_sigma=False)
  assert (flow.name, flow.samplers) == ("flow", ("euler", "heun", "sde"))
  assert flow.default_sampler == "euler" and flow.default_steps >= 1
  # A config without the section (or None) falls back to the defaults.
  assert diffusion.create("flow", ml_collections.ConfigDict(),
                          learn_sigma=False).path == "linear"
  assert isinstance(ddpm, diffusion.Objective)


@pytest.mark.parametrize("objective,learn_sigma", [("ddpm", True),
                                                   ("ddpm", False),
                                                   ("flow", False),
                                                   ("flow", True)])
def test_every_sampler_runs_jitted_with_guidance(objective, learn_sigma):
  obj = diffusion.create(objective, None, learn_sigma=learn_sigma)
  c = 4
  def model_fn(x, t, y):
    out = -0.5 * x + 1e-4 * t[:, None, None, None] + 0.01 * y[:, None, None,
                                                                None]
    return jnp.concatenate([out, jnp.zeros_like(out)], -1) if learn_sigma \
        else out
  noise = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, c))
  g = diffusion.Guidance(scale=1.5, null_label=7, channels=3,
                         interval=(0.0, 0.7))
  for sampler in obj.samplers:
    f = jax.jit(functools.partial(obj.sample, model_fn, sampler=sampler,
                                  steps=3, guidance=g))
    x = f(noise, jax.random.PRNGKey(1), y=jnp.array([1, 2]))
    assert x.shape == noise.shape and x.dtype == jnp.float32
    assert np.all(np.isfinite(x)), sampler


def _raises(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match):
    fn(*args, **kwargs)


def test_bad_objective_and_config():
  _raises(r"\('ddpm', 'flow'\)", diffusion.create, "edm", None,
          learn_sigma=False)
  cfg = diffusion.default_config()
  cfg.flow.bogus = 1
  _raises("bogus", diffusion.create, "flow", cfg, learn_sigma=False)
  for section, key, value, allowed in [
      ("flow", "path", "vp", "gvp"),
      ("flow", "prediction", "x0", "score"),
      ("flow", "time_sampling", "lognormal", "logit_normal"),
      ("flow", "loss_weight", "snr", "likelihood"),
      ("flow", "sde_diffusion", "SBDM", "sbdm"),
      ("flow", "sde_last_step", "Mean", "tweedie"),
      ("flow", "sampler", "dopri5", "heun"),
      ("ddpm", "beta_schedule", "quad", "cosine"),
      ("ddpm", "loss_type", "l1", "rescaled_kl"),
      ("ddpm", "spacing", "uniform", "ddim"),
      ("ddpm", "dpm_grid", "karras", "logsnr"),
      ("ddpm", "sampler", "euler", "dpm++"),
  ]:
    cfg = diffusion.default_config()
    cfg[section][key] = value
    _raises(allowed, diffusion.create, section, cfg, learn_sigma=False)
  cfg = diffusion.default_config()
  cfg.ddpm.steps = 0
  _raises(">= 1", diffusion.create, "ddpm", cfg, learn_sigma=False)


def test_bad_sample_arguments():
  noise = jnp.zeros((1, 2, 2, 1))
  model_fn = lambda x, t, y: x
  for objective, other in [("ddpm", "euler"), ("flow", "ddim")]:
    obj = diffusion.create(objective, None, learn_sigma=False)
    allowed = repr(obj.samplers)
    allowed = allowed.replace("(", r"\(").replace(")", r"\)").replace(
        "+", r"\+")
    _raises(allowed, obj.sample, model_fn, noise, None, sampler=other)
    _raises(">= 1", obj.sample, model_fn, noise, None,
            sampler=obj.samplers[1], steps=0)
    _raises("allowed", obj.sample, model_fn, noise, None,
            sampler=obj.samplers[1], steps=2, bogus=3)
  obj = diffusion.create("flow", None, learn_sigma=False)
  _raises("sigma", obj.sample, model_fn, noise, jax.random.PRNGKey(0),
          sampler="sde", steps=2, diffusion_form="vp")
  _raises("last_step_size", obj.sample, model_fn, noise,
          jax.random.PRNGKey(0), sampler="sde", steps=2, last_step_size=1.5)
  _raises("Guidance", obj.sample, model_fn, noise, None, guidance="strong")
