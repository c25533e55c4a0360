"""The analytic accuracy harness: every sampler against known distributions.

The network is the Bayes-optimal one for Gaussian / Gaussian-mixture data
(diffusion_oracles.py), so the only errors left are the sampler's own
(discretisation, the finite start time) and Monte Carlo noise. With N = 20k
samples the standard error of a mean entry is sqrt(var / N) <= 0.01 and of
a covariance entry about sqrt(2) var / sqrt(N) <= 0.02 (largest variance 2).

Tolerances, stated per case below as (mean, cov) max-abs errors, are about 4
standard errors plus the sampler's discretisation error at that step count.
Measured errors (fixed seeds) are printed with ``pytest -s``.
"""
import functools

import diffusion_oracles as oracles
import jax
import numpy as np
import pytest

from jdit import diffusion

N = 20_000
DATA = {"diag": oracles.diag_gaussian, "full": oracles.full_gaussian,
        "mixture": oracles.two_modes}


def _check_moments(name, samples, data, tol_mean, tol_cov):
  assert np.all(np.isfinite(samples)), name
  mean, cov = oracles.moments(samples)
  err_mean = np.abs(mean - data.mean()).max()
  err_cov = np.abs(cov - data.cov()).max()
  print(f"{name}: mean err {err_mean:.4f} (tol {tol_mean}), "
        f"cov err {err_cov:.4f} (tol {tol_cov})")
  assert err_mean < tol_mean and err_cov < tol_cov, (err_mean, err_cov)


def _noise(data, n=N, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n,) + data.shape)


def _ddpm(learn_sigma, **overrides):
  cfg = diffusion.default_config()
  cfg.ddpm.update(overrides)
  return diffusion.create("ddpm", cfg, learn_sigma=learn_sigma)


def _flow(**overrides):
  cfg = diffusion.default_config()
  cfg.flow.update(overrides)
  return diffusion.create("flow", cfg, learn_sigma=False)


# (data, learn_sigma, sampler, steps, options, tol_mean, tol_cov)
DDPM_CASES = [
    ("diag", True, "ddpm", 250, {}, 0.04, 0.08),
    ("mixture", True, "ddpm", 250, {}, 0.03, 0.04),
    ("full", False, "ddpm", 100, {}, 0.03, 0.05),
    ("full", True, "ddim", 50, {}, 0.03, 0.1),
    # eta = 1 is ancestral sampling with the posterior ("small") variance:
    # with 100 steps it visibly under-disperses (cov err ~0.07 measured).
    ("full", False, "ddim", 100, {"eta": 1.0, "spacing": "ddim"}, 0.03, 0.1),
    ("full", True, "dpm++", 20, {}, 0.03, 0.06),
    ("mixture", False, "dpm++", 25, {}, 0.03, 0.03),
    ("full", True, "dpm++", 50, {"grid": "time"}, 0.03, 0.06),
]


@pytest.mark.parametrize("case", DDPM_CASES, ids=lambda c: "-".join(
    str(v) for v in c[:4]))
def test_ddpm_samplers_reproduce_moments(case):
  data_name, learn_sigma, sampler, steps, options, tol_m, tol_c = case
  data = DATA[data_name]()
  obj = _ddpm(learn_sigma)
  model_fn = oracles.ddpm_model(data, learn_sigma)
  sample = jax.jit(functools.partial(obj.sample, model_fn, sampler=sampler,
                                     steps=steps, **options))
  x = sample(_noise(data), jax.random.PRNGKey(1))
  assert x.shape == (N,) + data.shape
  _check_moments(f"ddpm/{case[:4]}", np.asarray(x), data, tol_m, tol_c)


# (data, path, prediction, sampler, steps, options, tol_mean, tol_cov)
FLOW_CASES = [
    ("full", "linear", "velocity", "euler", 100, {}, 0.03, 0.05),
    ("diag", "gvp", "noise", "euler", 100, {}, 0.04, 0.06),
    ("mixture", "linear", "velocity", "heun", 20, {}, 0.03, 0.04),
    ("full", "gvp", "score", "heun", 20, {}, 0.03, 0.04),
    ("diag", "linear", "velocity", "heun", 20, {"shift": 3.0}, 0.04, 0.06),
    ("mixture", "linear", "velocity", "sde", 250, {}, 0.03, 0.04),
    ("full", "linear", "noise", "sde", 250,
     {"diffusion_form": "sbdm", "last_step": "tweedie"}, 0.03, 0.05),
    ("diag", "gvp", "velocity", "sde", 250,
     {"diffusion_form": "constant", "last_step": "euler"}, 0.04, 0.08),
    ("full", "linear", "score", "sde", 250, {"last_step": "none"}, 0.03,
     0.05),
]


@pytest.mark.parametrize("case", FLOW_CASES, ids=lambda c: "-".join(
    str(v) for v in c[:5]))
def test_flow_samplers_reproduce_moments(case):
  data_name, path, prediction, sampler, steps, options, tol_m, tol_c = case
  data = DATA[data_name]()
  obj = _flow(path=path, prediction=prediction)
  model_fn = oracles.flow_model(data, path, prediction)
  sample = jax.jit(functools.partial(obj.sample, model_fn, sampler=sampler,
                                     steps=steps, **options))
  x = sample(_noise(data), jax.random.PRNGKey(1))
  _check_moments(f"flow/{case[:5]}", np.asarray(x), data, tol_m, tol_c)


@pytest.mark.parametrize("path,sampler,steps", [("linear", "heun", 20),
                                                ("gvp", "euler", 100)])
def test_sit_convention_checkpoints_sample_the_data(path, sampler, steps):
  """model_time_flip: a network trained in SiT's reversed time (s = 1 data,
  velocity = data - noise, input s unscaled) samples the data distribution.
  """
  data = DATA["full"]()
  obj = _flow(path=path, prediction="velocity", model_time_flip=True,
              model_time_scale=1.0)
  model_fn = oracles.sit_velocity_model(data, path, channels=True)
  sample = jax.jit(functools.partial(obj.sample, model_fn, sampler=sampler,
                                     steps=steps))
  x = sample(_noise(data), jax.random.PRNGKey(1))
  _check_moments(f"sit/{path}/{sampler}", np.asarray(x), data, 0.03, 0.05)


def test_mixture_mode_weights():
  """The Heun flow sampler puts 30% / 70% of the mass on the two modes."""
  data = oracles.two_modes()
  obj = _flow()
  x = obj.sample(oracles.flow_model(data, "linear", "velocity"),
                 _noise(data), None, sampler="heun", steps=20)
  x = np.asarray(x).reshape(N, 2)
  d = ((x[:, None, :] - data.means[None]) ** 2).sum(-1)
  frac = np.bincount(d.argmin(1), minlength=2) / N
  np.testing.assert_allclose(frac, data.weights, atol=0.015)


# Convergence orders of the deterministic samplers: RMS error, on a fixed
# noise batch, against the EXACT probability-flow ODE solution (closed form
# for Gaussian data), fitted as a log-log slope against the step count.

B_ORDER = 256


def _rms(x, ref):
  return float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref) ** 2)))


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_flow_ode_orders(path):
  data = oracles.full_gaussian()
  noise = _noise(data, B_ORDER)
  ref = data.ode_map(np.asarray(noise, np.float64), 0.0, 1.0, 1.0, 0.0)
  obj = _flow(path=path)
  model_fn = oracles.flow_model(data, path, "velocity")
  steps = [4, 8, 16, 32]
  slopes = {}
  for sampler in ("euler", "heun"):
    errs = [_rms(obj.sample(model_fn, noise, None, sampler=sampler, steps=n),
                 ref) for n in steps]
    slopes[sampler] = oracles.slope(steps, errs)
    print(path, sampler, dict(zip(steps, np.round(errs, 6))),
          f"slope {slopes[sampler]:.2f}")
  assert -1.15 < slopes["euler"] < -0.85
  assert -2.3 < slopes["heun"] < -1.8


def test_ddpm_ode_orders():
  """DDIM (eta = 0) is first order, DPM-Solver++(2M) second order."""
  data = oracles.full_gaussian()
  noise = _noise(data, B_ORDER)
  log_abar = oracles.ddpm_log_abar()
  a = lambda t: np.exp(0.5 * log_abar[t])
  s = lambda t: np.sqrt(-np.expm1(log_abar[t]))
  # Both samplers start from noise at t = 999 and return E[x0 | x_0] after
  # reaching t = 0: the exact limit is the ODE map 999 -> 0, then Tweedie.
  x_end = data.ode_map(np.asarray(noise, np.float64), a(999), s(999), a(0),
                       s(0))
  ref = data.x0_mean_np(x_end, a(0), s(0))
  obj = _ddpm(False)
  model_fn = oracles.ddpm_model(data, False)
  run = lambda sampler, n, **kw: _rms(obj.sample(
      model_fn, noise, None, sampler=sampler, steps=n, **kw), ref)
  steps = [8, 16, 32, 64]
  ddim = [run("ddim", n) for n in steps]
  # DPM-Solver++(2M) reaches its asymptotic regime from ~16 steps.
  steps2 = [16, 24, 32, 48, 64]
  dpm = [run("dpm++", n) for n in steps2]
  s_ddim, s_dpm = oracles.slope(steps, ddim), oracles.slope(steps2, dpm)
  print("ddim", dict(zip(steps, np.round(ddim, 6))), f"slope {s_ddim:.2f}")
  print("dpm++", dict(zip(steps2, np.round(dpm, 6))), f"slope {s_dpm:.2f}")
  assert -1.15 < s_ddim < -0.85
  assert -2.3 < s_dpm < -1.75
  assert dpm[2] < ddim[2] / 5  # At 32 steps.


def test_ddim_eta_one_is_ddpm_with_small_variance():
  """Same keys, same noise: DDIM(eta=1) and DDPM(fixed_small) coincide."""
  data = oracles.full_gaussian()
  noise, key = _noise(data, 64), jax.random.PRNGKey(3)
  model_fn = oracles.ddpm_model(data, False)
  x_ddim = _ddpm(False).sample(model_fn, noise, key, sampler="ddim", steps=20,
                               eta=1.0)
  x_ddpm = _ddpm(False, sigma_small=True).sample(model_fn, noise, key,
                                                 sampler="ddpm", steps=20)
  np.testing.assert_allclose(x_ddim, x_ddpm, atol=2e-4, rtol=1e-4)


def test_deterministic_samplers_ignore_key_stochastic_use_it():
  data = oracles.diag_gaussian()
  noise = _noise(data, 8)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  for obj, model_fn, det, sto in [
      (_ddpm(True), oracles.ddpm_model(data, True), ("ddim", "dpm++"),
       ("ddpm",)),
      (_flow(), oracles.flow_model(data, "linear", "velocity"),
       ("euler", "heun"), ("sde",))]:
    for sampler in det + sto:
      if sampler in sto:  # Deterministic ones accept key=None.
        with pytest.raises(ValueError, match="stochastic"):
          obj.sample(model_fn, noise, None, sampler=sampler, steps=5)
      sample = jax.jit(functools.partial(obj.sample, model_fn,
                                         sampler=sampler, steps=5))
      x1, x2 = sample(noise, k1), sample(noise, k2)
      assert x1.shape == noise.shape and np.all(np.isfinite(x1))
      assert np.array_equal(x1, x2) == (sampler in det), sampler
