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
