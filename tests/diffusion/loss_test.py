"""Training losses: analytic minima, hybrid terms, gradients, time sampling.

For Gaussian data N(mu, S) (eigenvalues lambda_j) and the Bayes-optimal
network, the expected loss is closed-form per eigen-direction:

* eps MSE:      a^2 lambda / (a^2 lambda + s^2)  (= Var[eps | x_t]),
* velocity MSE: (a s' - s a')^2 lambda / (a^2 lambda + s^2),

averaged over the dimensions and the training-time distribution (computed
here by quadrature). The Monte Carlo loss over 20k examples must match it.
"""
import diffusion_oracles as oracles
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import diffusion

N = 20_000


def _data_batch(data, n=N, seed=0):
  return jnp.asarray(data.sample(np.random.default_rng(seed), n), jnp.float32)


def test_ddpm_loss_at_optimum():
  data = oracles.full_gaussian()
  obj = diffusion.create("ddpm", diffusion.default_config(), learn_sigma=False)
  loss, metrics = jax.jit(lambda x, k: obj.loss(
      oracles.ddpm_model(data, False), x, k))(_data_batch(data),
                                              jax.random.PRNGKey(1))
  abar = np.exp(oracles.ddpm_log_abar())[:, None]  # t ~ U{0..999}
  lam = data.lam[0][None]
  expected = np.mean(abar * lam / (abar * lam + 1 - abar))
  print(f"ddpm loss {float(loss):.4f} expected {expected:.4f}")
  assert loss.shape == () and set(metrics) == {"mse"}
  # Monte Carlo standard error over 20k examples: ~1.7% (measured over 8
  # seeds: mean 0.2338 +- 0.0039); tolerance 3.5 standard errors.
  np.testing.assert_allclose(float(loss), expected, rtol=0.06)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_min_snr_weighting(learn_sigma):
  """Min-SNR-5: at the optimum the expected loss is the closed form with
  each timestep's MSE weighted by min(SNR, 5) / SNR; the "mse" metric stays
  unweighted; with learned sigma the VB term is not weighted."""
  data = oracles.full_gaussian()
  config = diffusion.default_config()
  config.ddpm.min_snr_gamma = 5.0
  obj = diffusion.create("ddpm", config, learn_sigma=learn_sigma)
  abar = np.exp(oracles.ddpm_log_abar())
  snr = abar / (1 - abar)
  weight = np.minimum(snr, 5.0) / snr
  assert weight[0] < 1e-3 and weight[-1] == 1.0  # clean steps down-weighted
  np.testing.assert_allclose(obj.diffusion.mse_weight(jnp.arange(1000)),
                             weight, rtol=1e-6)
  x0 = _data_batch(data)
  loss, metrics = jax.jit(lambda x, k: obj.loss(
      oracles.ddpm_model(data, learn_sigma), x, k))(x0, jax.random.PRNGKey(1))
  lam = data.lam[0][None]
  mse = abar[:, None] * lam / (abar[:, None] * lam + 1 - abar[:, None])
  expected = np.mean(weight[:, None] * mse)
  # The same Monte Carlo draws as test_ddpm_loss_at_optimum (rtol there).
  vb = float(metrics.get("vb", 0.0))
  np.testing.assert_allclose(float(loss) - vb, expected, rtol=0.06)
  np.testing.assert_allclose(float(metrics["mse"]), np.mean(mse), rtol=0.06)
  with pytest.raises(ValueError, match="min_snr_gamma"):
    config.ddpm.loss_type = "kl"
    diffusion.create("ddpm", config, learn_sigma=True)


def test_ddpm_hybrid_loss_and_gradients():
  data = oracles.diag_gaussian()
  obj = diffusion.create("ddpm", diffusion.default_config(), learn_sigma=True)
  x0 = _data_batch(data, 64)

  def loss_fn(p):
    def model_fn(x, t, y):
      assert y is None
      eps = p["a"] * x + 0.0 * t[:, None, None, None]
      return jnp.concatenate([eps, jnp.tanh(p["v"]) * jnp.ones_like(x)], -1)
    return obj.loss(model_fn, x0, jax.random.PRNGKey(0))

  params = {"a": jnp.asarray(0.5), "v": jnp.asarray(0.3)}
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      loss_fn, has_aux=True))(params)
  assert set(metrics) == {"mse", "vb"}
  assert np.isfinite(float(loss)) and float(metrics["vb"]) > 0
  np.testing.assert_allclose(float(loss),
                             float(metrics["mse"] + metrics["vb"]), rtol=1e-5)
  for name in ("a", "v"):  # Both the mean and the variance get gradients.
    assert np.isfinite(float(grads[name])) and float(grads[name]) != 0.0


def _quadrature(f, sampling, mean=0.0, std=1.0, shift=1.0, lo=0.0, hi=1.0):
  """E f(t) over the flow objective's training-time distribution."""
  if sampling == "uniform":
    u = (np.arange(200_000) + 0.5) / 200_000
    w = np.full_like(u, 1 / len(u))
  else:
    n, w = np.polynomial.hermite_e.hermegauss(200)
    w = w / w.sum()
    u = 1 / (1 + np.exp(-(mean + std * n)))
  t = shift * u / (1 + (shift - 1) * u)
  return np.sum(w * f(lo + (hi - lo) * t))


def _coeffs(path, t):
  if path == "linear":
    return 1 - t, t, -np.ones_like(t), np.ones_like(t)
  h = np.pi / 2
  return np.cos(h * t), np.sin(h * t), -h * np.sin(h * t), h * np.cos(h * t)


FLOW_CASES = [
    # path, prediction, loss_weight, time sampling options
    ("linear", "velocity", "none", {}),
    ("linear", "velocity", "none", {"time_sampling": "logit_normal",
                                    "logit_mean": 0.3, "logit_std": 0.8}),
    ("linear", "velocity", "none", {"time_shift": 3.0}),
    ("gvp", "velocity", "none", {}),
    ("linear", "noise", "none", {}),
    ("gvp", "score", "none", {}),
    ("linear", "velocity", "likelihood", {}),
    ("linear", "noise", "velocity", {}),
]


@pytest.mark.parametrize("case", FLOW_CASES, ids=lambda c: "-".join(
    [c[0], c[1], c[2]] + sorted(c[3])))
def test_flow_loss_at_optimum(case):
  path, prediction, weight, options = case
  data = oracles.full_gaussian()
  cfg = diffusion.default_config()
  cfg.flow.update(dict(path=path, prediction=prediction, loss_weight=weight,
                       **options))
  obj = diffusion.create("flow", cfg, learn_sigma=False)
  model_fn = oracles.flow_model(data, path, prediction)
  loss, metrics = jax.jit(lambda x, k: obj.loss(model_fn, x, k))(
      _data_batch(data), jax.random.PRNGKey(1))
  lam = data.lam[0]

  def expected_at(t):
    t = t[:, None]
    a, s, da, ds = _coeffs(path, t)
    if prediction == "velocity":
      per_dim = (a * ds - s * da) ** 2 * lam / (a * a * lam + s * s)
    else:  # noise, and score in SiT's eps-space form
      per_dim = a * a * lam / (a * a * lam + s * s)
    w = np.ones_like(t)
    drift_var = s * ds - s * s * da / a  # SiT compute_drift()[1]
    if weight == "likelihood":  # velocity prediction: sigma^2 / lambda
      w = s * s / drift_var
    elif weight == "velocity" and prediction != "velocity":
      w = (drift_var / s) ** 2
    return (w * per_dim).mean(-1)

  eps = 0.0 if prediction == "velocity" else 1e-3  # SiT's train_eps
  expected = _quadrature(
      expected_at, options.get("time_sampling", "uniform"),
      options.get("logit_mean", 0.0), options.get("logit_std", 1.0),
      options.get("time_shift", 1.0), eps, 1 - eps)
  print(f"{case}: loss {float(loss):.4f} expected {expected:.4f}")
  assert set(metrics) == {"mse"} and np.isfinite(float(metrics["mse"]))
  # Standard error ~0.5-1% (linear velocity: 1.3081 +- 0.0068 over 8 seeds).
  np.testing.assert_allclose(float(loss), expected, rtol=0.04)


def test_flow_loss_gradient_and_learned_sigma_layout():
  data = oracles.diag_gaussian()
  x0 = _data_batch(data, 32)
  obj = diffusion.create("flow", diffusion.default_config(), learn_sigma=True)

  def loss_fn(a):
    # 2C outputs (DiT layout): the extra channels must be ignored.
    model_fn = lambda x, t, y: jnp.concatenate([a * x, 1e3 * x], -1)
    return obj.loss(model_fn, x0, jax.random.PRNGKey(0))[0]

  loss, grad = jax.value_and_grad(loss_fn)(0.3)
  assert np.isfinite(float(loss)) and float(loss) < 20
  assert np.isfinite(float(grad)) and float(grad) != 0.0
  with pytest.raises(ValueError, match="channels"):
    obj.loss(lambda x, t, y: jnp.zeros(x.shape[:-1] + (3,)), x0,
             jax.random.PRNGKey(0))


def test_flow_time_sampling():
  cfg = diffusion.default_config()
  cfg.flow.update(time_sampling="logit_normal", logit_mean=-0.5,
                  logit_std=1.5)
  obj = diffusion.create("flow", cfg, learn_sigma=False)
  t = np.asarray(obj.sample_time(jax.random.PRNGKey(0), 100_000))
  logit = np.log(t / (1 - t))
  np.testing.assert_allclose([logit.mean(), logit.std()], [-0.5, 1.5],
                             atol=0.02)
  cfg.flow.update(time_sampling="uniform", time_shift=3.0)
  obj = diffusion.create("flow", cfg, learn_sigma=False)
  t = np.asarray(obj.sample_time(jax.random.PRNGKey(0), 100_000))
  # P(t' <= 0.5) = P(u <= 0.5 / (3 - 2 * 0.5)) = 0.25.
  np.testing.assert_allclose(np.mean(t <= 0.5), 0.25, atol=0.005)
  cfg.flow.update(prediction="noise", time_shift=1.0)
  obj = diffusion.create("flow", cfg, learn_sigma=False)
  t = np.asarray(obj.sample_time(jax.random.PRNGKey(0), 100_000))
  assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3  # train_eps for noise


def test_model_time_conventions():
  ddpm = diffusion.create("ddpm", None, learn_sigma=True)
  np.testing.assert_array_equal(ddpm.model_time(jnp.array([0, 999])),
                                [0.0, 999.0])
  flow = diffusion.create("flow", None, learn_sigma=False)
  np.testing.assert_allclose(flow.model_time(jnp.array([0.0, 0.25, 1.0])),
                             [0.0, 250.0, 1000.0])
  cfg = diffusion.default_config()
  cfg.flow.update(model_time_flip=True, model_time_scale=1.0)  # SiT
  flow = diffusion.create("flow", cfg, learn_sigma=False)
  np.testing.assert_allclose(flow.model_time(jnp.array([0.0, 0.25])),
                             [1.0, 0.75])


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_sit_convention_loss_equals_ours(path):
  """The Bayes-optimal network in SiT's reversed time (model_time_flip) has
  the same loss as the Bayes-optimal network in ours; a velocity of the
  wrong sign would cost about 4 |v|^2 more."""
  data = oracles.diag_gaussian()
  x0 = _data_batch(data, 256)
  cfg = diffusion.default_config()
  cfg.flow.update(path=path, model_time_flip=True, model_time_scale=1.0)
  sit = diffusion.create("flow", cfg, learn_sigma=True)
  cfg_ours = diffusion.default_config()
  cfg_ours.flow.update(path=path)
  ours = diffusion.create("flow", cfg_ours, learn_sigma=False)
  key = jax.random.key(3)
  loss_ours, _ = ours.loss(oracles.flow_model(data, path, "velocity"), x0, key)
  loss_sit, _ = sit.loss(oracles.sit_velocity_model(data, path, channels=True),
                         x0, key)
  np.testing.assert_allclose(loss_sit, loss_ours, rtol=1e-4)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_per_example_keys_split_into_micro_batches(objective):
  """With (B,) keys, example i's draws depend on key i only (grad accum)."""
  data = oracles.diag_gaussian()
  x0 = _data_batch(data, 8)
  obj = diffusion.create(objective, None, learn_sigma=objective == "ddpm")
  model_fn = lambda x, t, y: jnp.concatenate(
      [0.5 * x + 1e-4 * t[:, None, None, None]] * (2 if objective == "ddpm"
                                                   else 1), -1)
  keys = jax.random.split(jax.random.key(0), 8)
  loss = jax.jit(lambda x, k: obj.loss(model_fn, x, k)[0])
  halves = [loss(x0[:4], keys[:4]), loss(x0[4:], keys[4:])]
  np.testing.assert_allclose(loss(x0, keys), np.mean(halves), rtol=1e-5)
  with pytest.raises(ValueError, match="per-example keys"):
    obj.loss(model_fn, x0, keys[:3])


def test_flow_cosine_loss_term():
  """The direction term equals mean(1 - cos) recomputed in float64 from the
  network's inputs; it is 0 for any positive multiple of the true velocity
  and has finite gradients at a zero output (zero-initialised final layer)."""
  data = oracles.diag_gaussian()
  x0 = _data_batch(data, 16)
  mix = np.random.default_rng(0).normal(size=(x0.shape[-1],) * 2)
  seen = []

  def model_fn(x, t, y):  # a channel-mixing "network"; records its inputs
    seen.append((np.asarray(x, np.float64), np.asarray(t, np.float64)))
    return x @ jnp.asarray(mix, jnp.float32)

  cfg = diffusion.default_config()
  plain = diffusion.create("flow", cfg, learn_sigma=False)
  cfg.flow.cosine_loss = 0.5
  cosine = diffusion.create("flow", cfg, learn_sigma=False)
  key = jax.random.key(1)
  loss0, _ = plain.loss(model_fn, x0, key)
  loss, metrics = cosine.loss(model_fn, x0, key)
  x_t, time = seen[-1]
  t = (time / 1000.0)[:, None, None, None]
  x0_64 = np.asarray(x0, np.float64)
  u = (x_t - (1 - t) * x0_64) / t - x0_64  # eps - x0 on the linear path
  out = x_t @ mix
  cos = np.sum(out * u, -1) / (np.linalg.norm(out, axis=-1)
                               * np.linalg.norm(u, axis=-1))
  expected = np.mean(1 - cos)
  assert set(metrics) == {"mse", "cosine"}
  np.testing.assert_allclose(metrics["cosine"], expected, rtol=1e-4)
  np.testing.assert_allclose(loss - loss0, 0.5 * expected, rtol=1e-4)

  def velocity_times(c):  # c * (eps - x0), read off x_t as above
    def fn(x, time, y):
      tt = (time / 1000.0)[:, None, None, None]
      return c * ((x - (1 - tt) * x0) / tt - x0)
    return fn

  _, m = cosine.loss(velocity_times(3.0), x0, key)
  assert abs(float(m["cosine"])) < 1e-5
  grad = jax.grad(lambda a: cosine.loss(lambda x, tm, y: a * x, x0, key)[0])
  assert np.isfinite(float(grad(0.0)))


def test_flow_cosine_loss_needs_velocity():
  cfg = diffusion.default_config()
  cfg.flow.update(cosine_loss=1.0, prediction="noise")
  with pytest.raises(ValueError, match="cosine_loss"):
    diffusion.create("flow", cfg, learn_sigma=False)
  cfg.flow.update(cosine_loss=-1.0, prediction="velocity")
  with pytest.raises(ValueError, match="cosine_loss"):
    diffusion.create("flow", cfg, learn_sigma=False)
