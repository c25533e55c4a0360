"""Pre-extracted VAE latents as a training dataset.

`python -m jdit.data.extract_latents` writes a TFDS dataset (ArrayRecord,
random access, no TensorFlow needed to read) whose examples hold the moments
of the VAE posterior, a diagonal Gaussian, per image:

  latent_mean (h, w, c)   the posterior mean (unscaled, as the VAE outputs)
  latent_std  (h, w, c)   its standard deviation, exp(logvar / 2)
  label                   class id
  image       (H, W, 3)   the uint8 image, with --store_images (REPA)

Training draws z = mean + std * eps afresh at every step (what DiT's online
encoding did with `.sample()`, and what REPA / EDM2 do from stored moments)
and multiplies by the VAE's scale factor, after normalising per channel for
VAEs that have latents_mean / latents_std (VA-VAE:
jdit.vae.AutoencoderKL.normalize_latents). Beside the dataset,
`latent_stats.json` records the VAE, image size, its scale factor and
per-channel normalisation, and per-channel statistics of z.

Datasets registered here (config.data.name; config.data.data_dir is the
extraction's --out directory):
  imagenet256_latents   256px images -> 32x32x4 latents, 1000 classes
  imagenet_latents      the same (alias)
  imagenet512_latents   512px images -> 64x64x4 latents, 1000 classes
  latents               any extraction: shape, classes and normalisation
                        from data_dir's latent_stats.json (VA-VAE, own
                        image folders, other resolutions)
`register(name, image_size, num_classes)` adds a fixed one, checked against
the file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from jdit.data import buckets
from jdit.data.pipeline import DATASETS, DatasetSpec
# The factor comes from the VAE's config; extract_latents records the factor
# of the VAE it used, and load() checks that it agrees with the spec's.
from jdit.vae import SD_VAE_SCALE_FACTOR, check_latent_stats, normalize

DATASET_NAME = "jdit_latents"
STATS_FILE = "latent_stats.json"


def features(latent_shape: tuple[int, int, int], class_names,
             dtype=np.float16, image_shape=None) -> tfds.features.FeaturesDict:
  """The stored features (plain tensors: no TensorFlow to encode them);
  with `image_shape`, also the uint8 image each latent encodes."""
  spec = {
      "latent_mean": tfds.features.Tensor(shape=latent_shape, dtype=dtype),
      "latent_std": tfds.features.Tensor(shape=latent_shape, dtype=dtype),
      "label": tfds.features.ClassLabel(names=list(class_names)),
  }
  if image_shape is not None:
    spec["image"] = tfds.features.Tensor(shape=tuple(image_shape),
                                         dtype=np.uint8)
  return tfds.features.FeaturesDict(spec)


def sample(batch: dict, rngs, *, scale_factor: float, latents_mean=None,
           latents_std=None) -> tuple[np.ndarray, np.ndarray]:
  """Stored moments -> (normalised z, labels), z = mean + std * eps.

  Args:
    batch: stacked examples with latent_mean, latent_std (B, h, w, c), label.
    rngs: one numpy Generator per example (the pipeline seeds them by seed,
      step and position, so resumed runs draw the same eps).
    scale_factor: the VAE's latent scale factor.
    latents_mean, latents_std: the VAE's per-channel normalisation (c values
      each) or None: the model sees (z - latents_mean) / latents_std *
      scale_factor, as AutoencoderKL.normalize_latents computes.
  """
  mean = batch["latent_mean"].astype(np.float32)
  std = batch["latent_std"].astype(np.float32)
  eps = np.stack([r.standard_normal(mean.shape[1:], np.float32)
                  for r in rngs])
  z = normalize(mean + std * eps, scale_factor, latents_mean, latents_std)
  return z, batch["label"].astype(np.int32)


def read_stats(directory: str) -> dict:
  path = os.path.join(directory, STATS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{directory!r} is not a latent dataset written by "
        f"jdit.data.extract_latents (no {STATS_FILE}); run `python -m "
        f"jdit.data.extract_latents ... --out {directory}` first")
  with open(path) as f:
    return json.load(f)


def load(split: str, data_dir: str, *, name: str, shape, num_classes: int,
         scale_factor: float, latents_mean=None, latents_std=None):
  """Opens the latent dataset in `data_dir`, checking it fits the spec."""
  if not data_dir:
    raise ValueError(f"dataset {name!r} needs config.data.data_dir: the --out "
                     f"directory of jdit.data.extract_latents")
  directory = os.path.expanduser(data_dir)
  stats = read_stats(directory)
  stored = tuple(stats["latent_shape"])
  if stored != tuple(shape):
    raise ValueError(
        f"latent dataset {directory!r} holds latents of shape {stored} "
        f"({stats.get('image_size')}px images), but dataset {name!r} and the "
        f"model expect {tuple(shape)}; use the dataset (and model "
        f"input_size) matching the extraction's --image_size")
  if stats["num_classes"] > num_classes:
    raise ValueError(f"latent dataset {directory!r} has "
                     f"{stats['num_classes']} classes, more than the "
                     f"{num_classes} of dataset {name!r}")
  if not np.isclose(stats["scale_factor"], scale_factor):
    raise ValueError(
        f"latent dataset {directory!r} was extracted with a VAE whose "
        f"scale_factor is {stats['scale_factor']}, but dataset {name!r} "
        f"scales by {scale_factor}; register one with that factor "
        f"(jdit.data.latents.register)")
  for key, want in (("latents_mean", latents_mean),
                    ("latents_std", latents_std)):
    got = stats.get(key)  # absent from files written before VA-VAE support
    if (got is None) != (want is None) or (
        got is not None and not np.allclose(got, want)):
      raise ValueError(
          f"latent dataset {directory!r} was extracted with a VAE whose "
          f"{key} is {got}, but dataset {name!r} normalises with {want}; "
          f"register one with the VAE's statistics "
          f"(jdit.data.latents.register)")
  builder = tfds.builder_from_directory(directory)
  if split not in builder.info.splits:
    raise ValueError(f"latent dataset {directory!r} has splits "
                     f"{list(builder.info.splits)}, not {split!r}")
  return builder.as_data_source(split=split)


def _spec(name: str, shape, num_classes: int, *, scale_factor: float,
          latents_mean=None, latents_std=None) -> DatasetSpec:
  check_latent_stats(latents_mean, latents_std, shape[-1],
                     f"latent dataset {name!r}")
  norm = dict(scale_factor=scale_factor,
              latents_mean=None if latents_mean is None
              else tuple(latents_mean),
              latents_std=None if latents_std is None else tuple(latents_std))
  return DatasetSpec(
      DATASET_NAME, shape, num_classes,
      functools.partial(sample, **norm), random=True,
      load=functools.partial(load, name=name, shape=shape,
                             num_classes=num_classes, **norm))


def register(name: str, image_size: int, num_classes: int = 1000, *,
             latent_channels: int = 4, downsample: int = 8,
             scale_factor: float = SD_VAE_SCALE_FACTOR, latents_mean=None,
             latents_std=None) -> DatasetSpec:
  """Registers a latent dataset in jdit.data.DATASETS and returns its spec.

  scale_factor, latents_mean and latents_std are the VAE's (its config's
  fields; VA-VAE f16d32: latent_channels=32, downsample=16, scale_factor=1.0
  and its 32 means and stds); the dataset checks them against the
  extraction's latent_stats.json when opened. The dataset "latents" needs
  no registration: it takes all of these from that file.
  """
  if image_size % downsample:
    raise ValueError(f"image_size {image_size} is not a multiple of the VAE's "
                     f"downsampling factor {downsample}")
  side = image_size // downsample
  spec = _spec(name, (side, side, latent_channels), num_classes,
               scale_factor=scale_factor, latents_mean=latents_mean,
               latents_std=latents_std)
  DATASETS[name] = spec
  return spec


def from_directory(data_dir: str) -> DatasetSpec:
  """The dataset "latents": whatever extraction is in `data_dir`, its latent
  shape, classes and the VAE's normalisation read from latent_stats.json
  (any VAE, any resolution, e.g. VA-VAE's 16x16x32 with its per-channel
  statistics)."""
  if not data_dir:
    raise ValueError("dataset 'latents' needs config.data.data_dir: the --out "
                     "directory of jdit.data.extract_latents")
  directory = os.path.expanduser(data_dir)
  if os.path.isfile(os.path.join(directory, buckets.BUCKETS_FILE)):
    return _bucketed(directory)
  stats = read_stats(directory)
  return _spec("latents", tuple(stats["latent_shape"]), stats["num_classes"],
               scale_factor=stats["scale_factor"],
               latents_mean=stats.get("latents_mean"),
               latents_std=stats.get("latents_std"))


def _bucketed(directory: str) -> DatasetSpec:
  """An extraction with --buckets: one latent dataset per aspect-ratio
  bucket in directory/<h>x<w>/ (jdit.data.buckets), listed in
  buckets.json; `load` returns their sources in that order."""
  with open(os.path.join(directory, buckets.BUCKETS_FILE)) as f:
    names = [b["name"] for b in json.load(f)["buckets"]]
  stats = [read_stats(os.path.join(directory, n)) for n in names]
  shapes = tuple(tuple(s["latent_shape"]) for s in stats)
  norm = dict(scale_factor=stats[0]["scale_factor"],
              latents_mean=stats[0].get("latents_mean"),
              latents_std=stats[0].get("latents_std"))
  num_classes = max(s["num_classes"] for s in stats)
  largest = max(shapes, key=lambda s: s[0] * s[1])
  spec = _spec("latents", largest, num_classes, **norm)
  # Each bucket's load checks its file against the common normalisation.
  load_one = [functools.partial(load, name=f"latents ({n})", shape=shape,
                                num_classes=num_classes, **norm)
              for n, shape in zip(names, shapes)]
  return dataclasses.replace(
      spec, buckets=shapes,
      load=lambda split, data_dir: [
          fn(split, os.path.join(data_dir, n))
          for fn, n in zip(load_one, names)])


DATASETS["latents"] = from_directory

register("imagenet256_latents", 256)
register("imagenet_latents", 256)  # alias: the DiT paper's main resolution
register("imagenet512_latents", 512)
