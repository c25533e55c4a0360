"""Deterministic, resumable input pipeline over random-access TFDS sources.

Batch `step` is a pure function of (seed, step): the example stream is a
concatenation of per-epoch permutations seeded by (seed, epoch), and the global
batch `step` covers stream positions [step * B, (step + 1) * B). Each host
reads its own contiguous slice of every global batch. Resuming therefore
needs only the step (the data position is the step stored in the checkpoint),
and the global batch does not depend on how many hosts or devices read it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from jdit.data import buckets


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset: its TFDS builder and how to turn examples
  (dicts of numpy arrays) into model inputs x (float32) and y.

  Attributes:
    builder: TFDS builder name.
    shape: (H, W, C) of x, as the model sees it.
    num_classes: labels are in [0, num_classes).
    to_model: batch -> (x, y); with `random`, (batch, rngs) -> (x, y), where
      rngs holds one numpy Generator per example, seeded by (seed, step,
      position in the global batch), so draws survive resume and do not
      depend on the number of hosts.
    builder_module: imported first to register the builder.
    random: whether to_model takes rngs (e.g. latents sampled from moments).
    load: (split, data_dir) -> random-access source, for datasets written
      by a tool (jdit.data.extract_latents) rather than prepared by a
      registered builder; None = tfds.builder(builder).download_and_prepare.
  """
  builder: str
  shape: tuple[int, ...]
  num_classes: int
  to_model: Callable[..., tuple[np.ndarray, np.ndarray]]
  builder_module: str | None = None
  random: bool = False
  load: Callable[[str, str], Any] | None = None
  buckets: tuple[tuple[int, ...], ...] = ()


def uint8_images(batch: dict) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images in [0, 255] -> float32 x in [-1, 1]; int32 labels."""
  x = batch["image"].astype(np.float32) / 127.5 - 1.0
  return x, batch["label"].astype(np.int32)


# A spec, or a function data_dir -> spec for datasets that describe
# themselves (a latent dataset's shape and normalisation are in its files).
DATASETS: dict[str, DatasetSpec | Callable[[str], DatasetSpec]] = {
    "digits": DatasetSpec("jdit_digits", (8, 8, 1), 10, uint8_images,
                          builder_module="jdit.data.digits"),
}


def get_spec(name: str, data_dir: str = "") -> DatasetSpec:
  """The spec of dataset `name` (config.data.name) in `data_dir`."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
  entry = DATASETS[name]
  return entry if isinstance(entry, DatasetSpec) else entry(data_dir)


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.expanduser("~/tensorflow_datasets"))


def load_source(name: str, split: str = "train", data_dir: str = ""):
  """Prepares the dataset if needed and returns a random-access source."""
  spec = get_spec(name, data_dir)
  if spec.load is not None:
    return spec.load(split, data_dir)
  if spec.builder_module:
    __import__(spec.builder_module)
  builder = tfds.builder(spec.builder, data_dir=data_dir or default_data_dir(),
                         file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source(split=split)


class _Prefetching:
  """batch(step) = load(step), with batch step + 1 loaded in the background
  (the train loop asks for consecutive steps)."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._pending: dict[int, Any] = {}

  def load(self, step: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Returns batch `step` and starts loading batch `step + 1`."""
    future = self._pending.pop(step, None)
    out = future.result() if future is not None else self.load(step)
    self._pending = {step + 1: self._pool.submit(self.load, step + 1)}
    return out


class InputPipeline(_Prefetching):
  """Host-local batches of a global batch, by step; prefetches one ahead."""

  def __init__(self, source, spec: DatasetSpec, *, global_batch_size: int,
               seed: int | tuple[int, ...], process_index: int = 0,
               process_count: int = 1, flip: bool = False,
               images: bool = False):
    """`images`: batches also carry the examples' stored uint8 "image"
    (flipped with x), e.g. for REPA on latents. `seed` may be a tuple (one
    stream of several, as BucketedPipeline's buckets)."""
    super().__init__()
    if global_batch_size % process_count:
      raise ValueError(f"batch_size {global_batch_size} must be divisible by "
                       f"the number of hosts {process_count}")
    self.source = source
    self.spec = spec
    self.size = len(source)
    if self.size == 0:
      raise ValueError("the dataset split is empty")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = (seed,) if isinstance(seed, int) else tuple(seed)
    self.offset = process_index * self.local_batch_size
    self.flip = flip
    self.images = images
    if images and "image" not in source[0]:
      raise ValueError(
          f"the dataset stores no images beside its examples (it has "
          f"{sorted(source[0])}); for latents, extract them with "
          f"--store_images")

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([*self.seed, epoch]).permutation(self.size)

  def indices(self, step: int) -> np.ndarray:
    """Dataset indices of this host's part of global batch `step`."""
    pos = (step * self.global_batch_size + self.offset
           + np.arange(self.local_batch_size))
    epochs, within = np.divmod(pos, self.size)
    return np.array([self._permutation(int(e))[w]
                     for e, w in zip(epochs, within)])

  def load(self, step: int) -> dict[str, np.ndarray]:
    """This host's part of global batch `step` (no prefetching)."""
    examples = self.source.__getitems__(self.indices(step).tolist())
    batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
    if self.spec.random:
      rngs = [np.random.default_rng([*self.seed, 2, step, self.offset + i])
              for i in range(self.local_batch_size)]
      x, y = self.spec.to_model(batch, rngs)
    else:
      x, y = self.spec.to_model(batch)
    if np.any((y < 0) | (y >= self.spec.num_classes)):
      raise ValueError(f"labels outside [0, {self.spec.num_classes}) in batch "
                       f"{step}")
    out = {"x": x, "y": y}
    if self.images:
      out["image"] = batch["image"]
    if self.flip:
      rng = np.random.default_rng([*self.seed, 1, step])
      mask = rng.random(self.global_batch_size)[
          self.offset:self.offset + self.local_batch_size] < 0.5
      out = {k: np.where(mask[:, None, None, None], v[:, :, ::-1], v)
             if k != "y" else v for k, v in out.items()}
    return out


class BucketedPipeline(_Prefetching):
  """Batches from aspect-ratio buckets (jdit.data.buckets), one bucket a
  batch, by step.

  An epoch holds len(bucket) // global_batch_size batches of every bucket in
  an order seeded by (seed, epoch); batch k of bucket b is batch k of an
  InputPipeline over b alone (seed (seed, b)). So batch `step` is a pure
  function of (seed, step), as for InputPipeline: resuming needs only the
  step, and the hosts agree on each step's bucket. Buckets smaller than one
  global batch are left out (`skipped` lists them).
  """

  def __init__(self, sources, spec: DatasetSpec, *, global_batch_size: int,
               seed: int, **kwargs):
    super().__init__()
    if len(sources) != len(spec.buckets):
      raise ValueError(f"{len(sources)} sources for {len(spec.buckets)} "
                       f"buckets")
    counts = [len(s) // global_batch_size for s in sources]
    self.skipped = [(shape, len(s)) for shape, s, c
                    in zip(spec.buckets, sources, counts) if c == 0]
    if not any(counts):
      raise ValueError(f"no bucket holds a whole batch of {global_batch_size} "
                       f"examples (bucket sizes: "
                       f"{[len(s) for s in sources]}); lower batch_size")
    self.seed = seed
    self.counts = counts
    self.steps_per_epoch = sum(counts)
    self.shapes = spec.buckets
    self.pipelines = [
        InputPipeline(s, spec, global_batch_size=global_batch_size,
                      seed=(seed, b), **kwargs) if c else None
        for b, (s, c) in enumerate(zip(sources, counts))]

  @functools.lru_cache(maxsize=2)
  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    return buckets.schedule(self.counts, self.seed, epoch)

  def locate(self, step: int) -> tuple[int, int]:
    """(bucket, batch of that bucket) that global batch `step` is."""
    epoch, i = divmod(step, self.steps_per_epoch)
    order, rank = self._epoch(epoch)
    b = int(order[i])
    return b, epoch * self.counts[b] + int(rank[i])

  def load(self, step: int) -> dict[str, np.ndarray]:
    bucket, k = self.locate(step)
    return self.pipelines[bucket].load(k)


def make_pipeline(source, spec: DatasetSpec, **kwargs) -> _Prefetching:
  """The pipeline for `source` (load_source's): an InputPipeline, or a
  BucketedPipeline for a dataset of aspect-ratio buckets."""
  if spec.buckets:
    return BucketedPipeline(source, spec, **kwargs)
  return InputPipeline(source, spec, **kwargs)
