"""The built-in offline dataset: scikit-learn's 1,797 8x8 handwritten digits.

Exposed as a real TFDS dataset (`jdit_digits`), prepared locally from the copy
scikit-learn ships, stored as ArrayRecord so that it is read through the same
random-access path as the ImageNet latents (jdit.data.pipeline).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


class JditDigits(tfds.core.GeneratorBasedBuilder):
  """8x8 grey digits, 10 classes; pixel values 0..16 scaled to 0..255."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From sklearn.datasets.load_digits."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="UCI ML hand-written digits (8x8), via scikit-learn.",
        features=tfds.features.FeaturesDict({
            # A plain uint8 tensor: tfds.features.Image would need TensorFlow
            # to PNG-encode, and the 8x8 images gain nothing from it.
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, digits.target)):
      yield i, {"image": image[..., None], "label": int(label)}


def classifier_agreement(images: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples that a digits classifier assigns their label.

  An SVM trained on all 1,797 real digits (about 99% accurate on held-out
  real digits) reads the generated (N, 8, 8, 1) uint8 images; agreement with
  the conditioning labels measures recognisability without a human.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.svm import SVC  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if images.shape[1:] != (8, 8, 1) or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 of shape (N, 8, 8, 1), got "
                     f"{images.dtype} {images.shape}")
  digits = load_digits()
  clf = SVC(gamma=0.001).fit(digits.data, digits.target)
  features = images.reshape(len(images), 64).astype(np.float64) * 16.0 / 255.0
  return float(np.mean(clf.predict(features) == np.asarray(labels)))


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) != 2:
    raise SystemExit("usage: python -m jdit.data.digits samples.npz")
  with np.load(sys.argv[1]) as f:
    print(f"classifier agreement: {classifier_agreement(f['arr_0'], f['arr_1']):.3f}")
