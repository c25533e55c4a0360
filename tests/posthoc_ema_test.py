"""Post-hoc EMA: the power EMA, its reconstruction, and the trainer's use."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jdit import checkpoint, posthoc_ema
from jdit import train as train_lib

T = 1000


def _trajectory():
  """A noisy, drifting scalar "parameter" over T steps."""
  tau = np.arange(1, T + 1)
  rng = np.random.default_rng(0)
  return np.sin(tau / 80.0) + 0.002 * tau + 0.05 * rng.standard_normal(T)


def _power_ema(theta, gamma):
  """The power EMA at every step, in float64, by the EDM2 update."""
  e, out = 0.0, []
  for t, x in enumerate(theta, start=1):
    b = float(posthoc_ema.ema_beta(t, gamma))
    e = b * e + (1 - b) * x
    out.append(e)
  return np.asarray(out)


def test_sigma_rel_and_gamma():
  # EDM2 (section 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
  assert posthoc_ema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
  assert posthoc_ema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
  for s in (0.01, 0.2, 0.29):
    g = posthoc_ema.sigma_rel_to_gamma(s)
    assert posthoc_ema.gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-9)
  for bad in (0.0, -0.1, 0.31):
    with pytest.raises(ValueError, match="sigma_rel"):
      posthoc_ema.sigma_rel_to_gamma(bad)


def test_update_is_the_power_average():
  """The EMA at step t weighs step tau by (tau/t)^(g+1) - ((tau-1)/t)^(g+1):
  density proportional to tau^g."""
  theta = _trajectory()[:200]
  gamma = posthoc_ema.sigma_rel_to_gamma(0.1)
  t = np.arange(1, 201, dtype=np.float64)
  weights = (t / 200) ** (gamma + 1) - ((t - 1) / 200) ** (gamma + 1)
  np.testing.assert_allclose(_power_ema(theta, gamma)[-1], weights @ theta,
                             rtol=2e-6)


def test_reconstruction_from_snapshots():
  theta = _trajectory()
  stored = (0.05, 0.10)
  gammas = [posthoc_ema.sigma_rel_to_gamma(s) for s in stored]
  emas = [_power_ema(theta, g) for g in gammas]
  snaps = [(s, k) for s in range(50, T + 1, 50) for k in range(2)]

  def rebuild(sigma_rel, step=T):
    rows = [(s, k) for s, k in snaps if s <= step]
    coef = posthoc_ema.solve_coefficients(
        [s for s, _ in rows], [gammas[k] for _, k in rows], step,
        posthoc_ema.sigma_rel_to_gamma(sigma_rel))
    return sum(x * emas[k][s - 1] for (s, k), x in zip(rows, coef))

  # A stored profile is rebuilt exactly; others to 1e-4 of a value ~1.3,
  # where the stored profiles differ by 0.1.
  assert rebuild(0.10) == pytest.approx(emas[1][-1], abs=1e-9)
  assert rebuild(0.05, step=500) == pytest.approx(emas[0][499], abs=1e-9)
  assert abs(emas[0][-1] - emas[1][-1]) > 0.05
  for target in (0.03, 0.075, 0.15):
    direct = _power_ema(theta, posthoc_ema.sigma_rel_to_gamma(target))[-1]
    assert rebuild(target) == pytest.approx(direct, abs=3e-4), target


def test_trainer_keeps_snapshots_and_the_cli_rebuilds(tiny_config, tmp_path,
                                                      capsys):
  c = tiny_config
  c.posthoc_ema.every = 2  # snapshots at steps 2 and 4 (total_steps)
  straight, resumed = tmp_path / "a", tmp_path / "b"
  train_lib.run(c, str(straight))
  train_lib.run(c, str(resumed), stop_at=3)
  train_lib.run(c, str(resumed))
  rows = lambda d: [json.loads(l)["loss"] for l in open(d / "metrics.jsonl")]
  assert rows(resumed) == rows(straight)
  mngr = posthoc_ema.snapshot_manager(str(straight), create=False)
  assert sorted(mngr.all_steps()) == [2, 4]

  # sigma_rel 0.10 at step 4 is the stored profile itself.
  out = str(tmp_path / "ckpt")
  posthoc_ema.main(["--workdir", str(resumed), "--sigma_rel", "0.1",
                    "--out", out])
  params, config = checkpoint.load_for_sampling(out)
  stored = mngr.restore(4, args=ocp.args.Composite(
      profiles=ocp.args.StandardRestore()))["profiles"][1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               params, stored)
  assert config.model.name == c.model.name
  # A sweep writes one checkpoint per width; bad widths write nothing.
  posthoc_ema.main(["--workdir", str(straight), "--scan", "0.05,0.2",
                    "--step", "2", "--out", str(tmp_path / "scan")])
  assert sorted(os.listdir(tmp_path / "scan")) == ["sigma_rel_0.05",
                                                   "sigma_rel_0.2"]
  with pytest.raises(SystemExit):
    posthoc_ema.main(["--workdir", str(straight), "--scan", "0.1,0.4",
                      "--out", str(tmp_path / "bad")])
  assert "sigma_rel" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def test_bad_posthoc_config_fails_before_training(tiny_config, tmp_path):
  c = tiny_config
  c.posthoc_ema.update(every=2, sigma_rels=(0.05, 0.5))
  with pytest.raises(ValueError, match=r"config.posthoc_ema.sigma_rels"):
    train_lib.run(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
  # Resuming a run that kept no power EMAs with them on is refused.
  c.posthoc_ema.update(every=0, sigma_rels=(0.05, 0.10))
  c.total_steps = 2
  train_lib.run(c, str(tmp_path))
  c.posthoc_ema.every, c.total_steps = 2, 4
  with pytest.raises(ValueError, match="posthoc_ema"):
    train_lib.run(c, str(tmp_path))
