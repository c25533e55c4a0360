"""FID, Inception Score and k-NN precision/recall from Inception features.

The definitions follow the ADM evaluator (openai/guided-diffusion
evaluations/evaluator.py), the protocol behind DiT's and most ImageNet
numbers:
  FID / sFID  Frechet distance of Gaussians fitted to pool / spatial
              features; float64 statistics, scipy.linalg.sqrtm.
  IS          exp(E_x KL(p(y|x) || p(y))) averaged over 10 equal splits
              (ADM uses splits of 5000, the same for 50k samples).
  P / R       Kynkaanniemi et al. 2019 with k = 3: a point is on a set's
              manifold if it lies within the k-th nearest-neighbour distance
              of some point of the set. Distances here are float32 (ADM
              tries float16 first).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


class FIDError(ValueError):
  """The Frechet distance could not be computed reliably."""


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> mean (D,) and covariance (D, D), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"statistics need (N >= 2, D) features, got "
                     f"{features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


# Indirection so tests can make the square root fail.
_sqrtm = linalg.sqrtm


def _trace_sqrt_product_eigh(s1, s2) -> float:
  """tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), by symmetric eigh.

  Mathematically the same as sqrtm's trace for PSD S1, S2; about 20x faster
  at 2048 dimensions and free of complex round-off.
  """
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root1 @ s2 @ root1
  ev = np.linalg.eigvalsh((m + m.T) / 2)
  if not np.all(np.isfinite(ev)):
    raise FIDError("FID: eigenvalues of the covariance product are not "
                   "finite")
  return float(np.sum(np.sqrt(np.clip(ev, 0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     method: str = "sqrtm") -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

  method "sqrtm" (default) is the TTUR/ADM computation with
  scipy.linalg.sqrtm: when the product's square root is not finite (a
  singular product, e.g. fewer samples than dimensions), eps is added to
  both diagonals and the root recomputed, with a warning (their fallback). A
  root with an imaginary part above 1e-3 on the diagonal means the
  covariances are not valid (not PSD or corrupt) and raises FIDError;
  smaller imaginary parts are rounding noise and are dropped. method "eigh"
  computes the same trace with symmetric eigendecompositions (much faster
  at 2048 dimensions, for quick in-training FID; agrees to ~1e-6 relative).
  """
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  s1, s2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or (
      s1.shape != (mu1.shape[0],) * 2):
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape},"
                     f" sigma {s1.shape} vs {s2.shape}")
  for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2),
                  ("sigma2", s2)):
    if not np.all(np.isfinite(a)):
      raise FIDError(f"{name} contains NaN or inf")
  diff = mu1 - mu2
  if method == "eigh":
    return float(diff @ diff + np.trace(s1) + np.trace(s2)
                 - 2.0 * _trace_sqrt_product_eigh(s1, s2))
  if method != "sqrtm":
    raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
  covmean = _sqrtm(s1 @ s2)
  if not np.all(np.isfinite(covmean)):
    warnings.warn(f"FID: sqrtm(sigma1 @ sigma2) is not finite (singular "
                  f"product); adding {eps} to the covariance diagonals")
    offset = np.eye(s1.shape[0]) * eps
    covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if not np.all(np.isfinite(covmean)):
      raise FIDError("FID: sqrtm(sigma1 @ sigma2) is not finite even with "
                     f"eps={eps} on the diagonals; the statistics are "
                     "degenerate (too few samples?)")
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > 1e-3:
      raise FIDError(f"FID: sqrtm(sigma1 @ sigma2) has an imaginary "
                     f"component of {imag:.3g} on its diagonal; the "
                     "covariances are not positive semi-definite")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2)
               - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> float:
  """Mean over splits of exp(E KL(p(y|x) || p(y))), from (N, K) logits."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < num_splits:
    raise ValueError(f"inception_score needs (N >= {num_splits}, K) logits,"
                     f" got {logits.shape}")
  # log-softmax directly: exact for saturated (one-hot) predictions.
  logp = logits - logits.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(logp, num_splits):
    p = np.exp(part)
    log_py = np.log(p.mean(axis=0, keepdims=True))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_py), axis=1))))
  return float(np.mean(scores))


@jax.jit
def _sq_distances(a, b):
  """Pairwise squared distances (ADM's norm expansion, clipped at 0)."""
  hi = jax.lax.Precision.HIGHEST
  na = jnp.sum(a * a, axis=1)[:, None]
  nb = jnp.sum(b * b, axis=1)[None, :]
  return jnp.maximum(na - 2.0 * jnp.dot(a, b.T, precision=hi) + nb, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_smallest(a, b, k):
  d = _sq_distances(a, b)
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


def _row_blocks(x: np.ndarray, block: int):
  """Yields (start, n_valid, padded block) so every call has one shape."""
  for start in range(0, len(x), block):
    rows = x[start:start + block]
    n = len(rows)
    if n < block:
      rows = np.concatenate([rows, np.zeros((block - n,) + rows.shape[1:],
                                            rows.dtype)])
    yield start, n, rows


def manifold_radii(features: np.ndarray, k: int = 3,
                   block: int = 1024) -> np.ndarray:
  """Squared distance from each point to its k-th nearest other point."""
  f = np.asarray(features, np.float32)
  if f.ndim != 2 or len(f) <= k:
    raise ValueError(f"manifold_radii needs (N > {k}, D) features, got "
                     f"{f.shape}")
  block = min(block, len(f))
  fj = jnp.asarray(f)
  radii = np.zeros(len(f), np.float32)
  for start, n, rows in _row_blocks(f, block):
    # Index k of the sorted row skips the point itself (distance 0).
    radii[start:start + n] = np.asarray(_kth_smallest(rows, fj, k))[:n]
  return radii


@jax.jit
def _pr_block(rows, row_radii, ref, ref_radii):
  d = _sq_distances(rows, ref)
  rows_in = jnp.any(d <= ref_radii[None, :], axis=1)
  ref_in = jnp.any(d <= row_radii[:, None], axis=0)
  return rows_in, ref_in


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     k: int = 3, block: int = 1024) -> tuple[float, float]:
  """ADM's improved precision and recall (k-NN manifolds).

  precision: fraction of samples inside the reference manifold;
  recall: fraction of reference points inside the sample manifold.
  """
  ref = np.asarray(ref_features, np.float32)
  samples = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
    raise ValueError(f"precision_recall needs (N, D) features of equal D, "
                     f"got {ref.shape} and {samples.shape}")
  ref_radii = manifold_radii(ref, k, block)
  sample_radii = manifold_radii(samples, k, block)
  block = min(block, len(samples))
  refj, ref_rj = jnp.asarray(ref), jnp.asarray(ref_radii)
  sample_in = np.zeros(len(samples), bool)
  ref_in = np.zeros(len(ref), bool)
  for start, n, rows in _row_blocks(samples, block):
    radii = np.full(block, -1.0, np.float32)  # padding rows cover nothing
    radii[:n] = sample_radii[start:start + n]
    rows_in, refs_in = _pr_block(rows, radii, refj, ref_rj)
    sample_in[start:start + n] = np.asarray(rows_in)[:n]
    ref_in |= np.asarray(refs_in)
  return float(sample_in.mean()), float(ref_in.mean())
