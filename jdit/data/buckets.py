"""Aspect-ratio buckets: training on images at (close to) their own shape.

Square centre crops throw away the sides of every wide or tall image. With
buckets, each image is instead assigned to the bucket, a (height, width)
of about the same area as the square, whose aspect ratio is nearest its own
(in log ratio), and cropped to it with ADM's resize-then-centre-crop
(jdit.data.imagenet.cover_crop), which for a near-fit bucket cuts little.
Every batch is drawn from one bucket, so shapes stay static: the train step
compiles once per bucket.

  python -m jdit.data.extract_latents ... --image_size 256 --buckets auto \\
      [--max_aspect 2] [--bucket_step 16] --out OUT

writes one latent dataset per bucket, OUT/<h>x<w>/ (each a complete
extraction, readable alone), and OUT/buckets.json listing them. Training on
config.data.name = "latents", config.data.data_dir = OUT reads them all
(jdit.data.latents), with batches scheduled by
jdit.data.pipeline.BucketedPipeline; sample at a bucket's shape with
`sample.py --input_size rows,cols`.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

BUCKETS_FILE = "buckets.json"


def aspect_buckets(size: int, step: int, max_aspect: float = 2.0
                   ) -> list[tuple[int, int]]:
  """(height, width) buckets of area at most size^2, sides multiples of
  `step`, aspect ratios up to `max_aspect` each way, ordered from the
  tallest to the widest; (size, size) is one of them.

  For each height h from `size` down in steps of `step`, the widest width
  that keeps the area within size^2 (as NovelAI's and SDXL's bucketing do),
  and its transpose.
  """
  if step < 1 or size < step or size % step:
    raise ValueError(f"the bucket size {size} must be a positive multiple "
                     f"of the bucket step {step}")
  if not max_aspect >= 1.0:
    raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
  wide = []
  for h in range(size, 0, -step):
    w = size * size // h // step * step
    if w / h > max_aspect:
      break
    wide.append((h, w))
  shapes = {s for h, w in wide for s in ((h, w), (w, h))}
  return sorted(shapes, key=lambda s: s[1] / s[0])


def parse_buckets(text: str) -> list[tuple[int, int]]:
  """'256x256,192x320' (height x width, pixels) -> [(256, 256), (192, 320)]."""
  shapes = []
  for item in text.split(","):
    m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
    if not m or min(int(m[1]), int(m[2])) < 1:
      raise ValueError(f"--buckets must be 'auto' or a comma-separated list "
                       f"of HEIGHTxWIDTH, got {text!r}")
    shapes.append((int(m[1]), int(m[2])))
  if len(set(shapes)) != len(shapes):
    raise ValueError(f"--buckets lists a shape twice: {text!r}")
  return shapes


def from_flags(spec: str, image_size: int, step: int | None,
               max_aspect: float, factor: int) -> list[tuple[int, int]]:
  """The (height, width) pixel buckets of extract_latents' --buckets: "auto"
  (aspect_buckets, sides multiples of `step` or of twice the VAE's
  downsampling `factor`) or an explicit list; checked against `factor`."""
  if spec == "auto":
    shapes = aspect_buckets(image_size, step or 2 * factor, max_aspect)
  else:
    shapes = parse_buckets(spec)
  check_buckets(shapes, factor)
  return shapes


def nearest_bucket(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]
                   ) -> np.ndarray:
  """Index of the bucket nearest in log aspect ratio for each (width,
  height) in `sizes`; ties go to the first listed."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  if np.any(sizes < 1):
    raise ValueError("image sizes must be positive")
  image = np.log(sizes[:, 0] / sizes[:, 1])
  bucket = np.log([w / h for h, w in buckets])
  return np.argmin(np.abs(image[:, None] - bucket[None]), axis=1)


def bucket_name(shape: Sequence[int]) -> str:
  """(height, width) -> 'HxW', the bucket's subdirectory."""
  return f"{shape[0]}x{shape[1]}"


def check_buckets(buckets: Sequence[tuple[int, int]], multiple: int) -> None:
  """Bucket sides must be multiples of the VAE's downsampling factor."""
  bad = [bucket_name(s) for s in buckets if s[0] % multiple or s[1] % multiple]
  if bad:
    raise ValueError(f"--buckets {','.join(bad)}: sides must be multiples of "
                     f"the VAE's downsampling factor {multiple}")


def schedule(counts: Sequence[int], seed: int, epoch: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """One epoch of bucket batches: counts[b] batches of bucket b, in an
  order seeded by (seed, epoch). Returns (bucket of each position, how many
  batches of that bucket come before it in the epoch)."""
  counts = np.asarray(counts, np.int64)
  order = np.random.default_rng([seed, 3, epoch]).permutation(
      np.repeat(np.arange(len(counts)), counts))
  rank = np.zeros(len(order), np.int64)
  for b in range(len(counts)):
    where = order == b
    rank[where] = np.arange(int(where.sum()))
  return order, rank

