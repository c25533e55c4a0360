"""Any image folder as a pixel-space dataset, by config alone.

  --config.data.name=folder64 --config.data.data_dir=/data/celeba_hq
  --config.data.name=folder64_unlabeled --config.data.data_dir=/data/ffhq

`folder<S>` (S in SIZES): ADM's centre crop to S x S of every image in
`data_dir`'s class subdirectories, labelled by the sorted directory names;
`folder<S>_unlabeled`: every image at any depth, one class (unconditional
models). `data_dir` is the folder root, or holds one root per split
(`train/`, `val/`). Images are decoded and cropped as batches are made
(jdit.data.imagenet.ImageFolder); for latent models, extract the folder
once with jdit.data.extract_latents instead.
"""
from __future__ import annotations

import functools
import os

from jdit.data import imagenet
from jdit.data.pipeline import DATASETS, DatasetSpec, uint8_images

SIZES = (32, 64, 128, 256, 512)


def _root(data_dir: str, split: str, name: str) -> str:
  if not data_dir:
    raise ValueError(f"dataset {name!r} needs config.data.data_dir: an "
                     f"image folder")
  root = os.path.expanduser(data_dir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config.data.data_dir {root!r} of dataset "
                            f"{name!r} does not exist")
  for sub in imagenet.FOLDER_SPLITS.get(split, (split,)):
    if os.path.isdir(os.path.join(root, sub)):
      return os.path.join(root, sub)
  if split != "train":
    raise ValueError(f"config.data.data_dir {root!r} of dataset {name!r} "
                     f"has no {split}/ directory")
  return root


def _load(split: str, data_dir: str, *, name: str, size: int, labels: str):
  return imagenet.ImageFolder(_root(data_dir, split, name), size,
                              labels=labels)


def _spec(data_dir: str, *, name: str, size: int, labels: str
          ) -> DatasetSpec:
  """The dataset's spec; its class count is the number of class
  directories (1 unlabeled), read without listing their files."""
  classes = 1
  if labels == "dirs":
    root = _root(data_dir, "train", name)
    classes = sum(e.is_dir() for e in os.scandir(root))
    if not classes:
      raise ValueError(f"image folder {root!r} of dataset {name!r} has no "
                       f"class subdirectories; unlabeled images are dataset "
                       f"'{name}_unlabeled'")
  return DatasetSpec(
      "image_folder", (size, size, 3), classes, uint8_images,
      load=functools.partial(_load, name=name, size=size, labels=labels))


for _size in SIZES:
  for _suffix, _labels in (("", "dirs"), ("_unlabeled", "none")):
    _name = f"folder{_size}{_suffix}"
    DATASETS[_name] = functools.partial(_spec, name=_name, size=_size,
                                        labels=_labels)
