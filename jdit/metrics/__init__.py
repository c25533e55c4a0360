"""Evaluation metrics in JAX: the FID Inception network and the ADM scores.

  from jdit.metrics import inception, scores
  params = inception.load_inception("pt_inception-2015-12-05-6726825d.pth")
  fid = scores.frechet_distance(mu1, sigma1, mu2, sigma2)

Command line: `python -m jdit.metrics.fid --samples ... --ref ... --inception
...` (see jdit/metrics/fid.py).
"""
from jdit.metrics.inception import (InceptionV3, inception_params_from_torch,
                                    load_inception, preprocess)
from jdit.metrics.scores import (FIDError, frechet_distance, inception_score,
                                 manifold_radii, precision_recall, statistics)

__all__ = ["FIDError", "InceptionV3", "frechet_distance",
           "inception_params_from_torch", "inception_score", "load_inception",
           "manifold_radii", "precision_recall", "preprocess", "statistics"]
