"""FID, IS and precision/recall against closed forms and brute force."""
import numpy as np
import pytest
from scipy import linalg

from jdit.metrics import scores


def _random_spd(rng, d, eigs):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return q, (q * eigs) @ q.T


def test_fid_commuting_gaussians_closed_form():
  rng = np.random.RandomState(0)
  d = 16
  e1, e2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  q, s1 = _random_spd(rng, d, e1)
  s2 = (q * e2) @ q.T  # same eigenvectors: S1 and S2 commute
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  # tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(e1) - sqrt(e2))^2 here.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(e1) - np.sqrt(e2)) ** 2)
  np.testing.assert_allclose(scores.frechet_distance(mu1, s1, mu2, s2),
                             expected, rtol=1e-9)


def test_fid_1d_and_identical_sets():
  # 1D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
  np.testing.assert_allclose(
      scores.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4.0 + 1.0)
  x = np.random.RandomState(1).normal(size=(500, 8))
  mu, sigma = scores.statistics(x)
  assert abs(scores.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_fid_non_commuting_matches_definition():
  rng = np.random.RandomState(2)
  a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
  s1, s2 = a @ a.T + np.eye(6), b @ b.T + np.eye(6)
  # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD form.
  r1 = linalg.sqrtm(s1).real
  expected = np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
  np.testing.assert_allclose(
      scores.frechet_distance(np.zeros(6), s1, np.zeros(6), s2), expected,
      rtol=1e-8)


def test_fid_nan_fallback_and_errors(monkeypatch):
  calls = []
  real = scores._sqrtm

  def flaky(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

  monkeypatch.setattr(scores, "_sqrtm", flaky)
  s = np.eye(3)
  with pytest.warns(UserWarning, match="adding 1e-06"):
    fid = scores.frechet_distance(np.zeros(3), s, np.zeros(3), s)
  assert abs(fid) < 1e-5 and len(calls) == 2
  np.testing.assert_allclose(calls[1], (1 + 1e-6) ** 2 * np.eye(3))

  monkeypatch.setattr(scores, "_sqrtm", lambda a: np.full_like(a, np.nan))
  with pytest.warns(UserWarning), pytest.raises(scores.FIDError,
                                                match="not finite"):
    scores.frechet_distance(np.zeros(3), s, np.zeros(3), s)
  monkeypatch.setattr(scores, "_sqrtm",
                      lambda a: a + 0.5j * np.eye(len(a)))
  with pytest.raises(scores.FIDError, match="imaginary component of 0.5"):
    scores.frechet_distance(np.zeros(3), s, np.zeros(3), s)
  monkeypatch.setattr(scores, "_sqrtm", lambda a: a + 1e-8j)
  assert abs(scores.frechet_distance(np.zeros(3), s, np.zeros(3), s)) < 1e-6
  monkeypatch.setattr(scores, "_sqrtm", real)
  with pytest.raises(scores.FIDError, match="sigma2 contains NaN"):
    scores.frechet_distance(np.zeros(3), s, np.zeros(3), s * np.nan)
  with pytest.raises(ValueError, match="mismatched"):
    scores.frechet_distance(np.zeros(3), s, np.zeros(2), np.eye(2))


def test_inception_score_known_logits():
  assert scores.inception_score(np.zeros((100, 7))) == pytest.approx(1.0)
  k = 10
  # Every split holds each class equally often, predicted with certainty.
  logits = np.tile(np.eye(k) * 1000.0, (10, 1))
  assert scores.inception_score(logits, num_splits=10) == pytest.approx(k)
  # Half-certain: p = (1/2, 1/2) over pairs -> exp(KL) = k / 2.
  pairs = np.zeros((k, k))
  for i in range(k):
    pairs[i, [i, (i + 1) % k]] = 50.0
  assert scores.inception_score(np.tile(pairs, (3, 1)), 3) == pytest.approx(
      k / 2)
  with pytest.raises(ValueError):
    scores.inception_score(np.zeros((5, 3)), num_splits=10)


def test_precision_recall_constructed():
  ref = np.zeros((10, 4), np.float32)
  ref[:, 0] = np.arange(10)  # points 0..9 on a line
  samples = np.zeros((10, 4), np.float32)
  samples[:5, 0] = np.arange(5)  # on the reference points 0..4
  samples[5:, 0] = 1000 + np.arange(5)  # far away
  # Reference 3-NN radii are 2 inside, 3 at the ends: samples 0..4 are in,
  # the far ones are not -> precision 1/2. Sample radii (3, 2, 2, 2, 3)
  # around 0..4 cover the reference points 0..7 -> recall 8/10.
  radii = scores.manifold_radii(ref, k=3)
  np.testing.assert_allclose(radii, [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
  p, r = scores.precision_recall(ref, samples, k=3, block=4)
  assert (p, r) == (0.5, 0.8)
  assert scores.precision_recall(ref, ref, k=3) == (1.0, 1.0)


def _brute_pr(ref, samples, k):
  def radii(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]
  rr, rs = radii(ref), radii(samples)
  d = ((samples[:, None] - ref[None]) ** 2).sum(-1)
  return (d <= rr[None]).any(1).mean(), (d <= rs[:, None]).any(0).mean()


def test_precision_recall_matches_brute_force():
  rng = np.random.RandomState(3)
  ref = rng.normal(size=(70, 5)).astype(np.float32)
  samples = (rng.normal(size=(53, 5)) * 1.3 + 0.4).astype(np.float32)
  p, r = scores.precision_recall(ref, samples, k=3, block=16)
  bp, br = _brute_pr(ref.astype(np.float64), samples.astype(np.float64), 3)
  assert abs(p - bp) <= 1 / 53 and abs(r - br) <= 1 / 70  # float32 ties
  assert 0 < p < 1 and 0 < r < 1


@pytest.mark.parametrize("n", [200, 12])  # full-rank and singular
def test_eigh_method_matches_sqrtm(n):
  rng = np.random.RandomState(4)
  x, y = rng.normal(size=(n, 40)), rng.normal(size=(n, 40)) * 1.5 + 0.2
  (m1, s1), (m2, s2) = scores.statistics(x), scores.statistics(y)
  a = scores.frechet_distance(m1, s1, m2, s2)
  b = scores.frechet_distance(m1, s1, m2, s2, method="eigh")
  np.testing.assert_allclose(b, a, rtol=1e-6)
