"""FID / sFID / IS / precision / recall of a sample batch, ADM-style, in JAX.

  python -m jdit.metrics.fid --samples samples.npz \
      --ref VIRTUAL_imagenet256_labeled.npz \
      --inception pt_inception-2015-12-05-6726825d.pth

prints one JSON object: fid, sfid, inception_score, precision, recall (null
where the reference batch lacks what a metric needs), num_samples, num_ref;
with `--dinov2 dinov2_vitl14_pretrain.pth` also fd_dinov2 (EDM2's Frechet
distance in DINOv2 ViT-L/14 class-token space, images resized to 224 with
antialiasing).
With `--write_ref OUT.npz` instead of `--ref`, it writes the (real) images
of --samples as a reference batch in ADM's format, for other datasets.

Inputs use the ADM evaluator's formats:
  samples  .npz with arr_0: uint8 (N, H, W, 3) images (sample.py writes this;
           arr_1 labels are ignored). Read in streaming batches, so 50k
           images need not fit in memory.
  ref      an ADM reference batch: .npz with mu, sigma (pool features) and
           mu_s, sigma_s (spatial), and/or arr_0 images. Precomputed
           statistics are used for FID/sFID when present; the images are
           needed for precision/recall (and for FID when there are no
           statistics).
Inception runs batched under one jit (one compile per image size); the
preprocessing defaults to ADM's (see jdit.metrics.inception).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import zipfile
from typing import Iterator

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jdit import dinov2, sharding
from jdit.metrics import inception, scores


def _read_header(f):
  """(shape, fortran_order, dtype) of an .npy stream, or None."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  return None


class ImageBatchReader:
  """Streams uint8 (N, H, W, 3) images from an .npz entry in batches."""

  def __init__(self, path: str, key: str = "arr_0"):
    self.path, self.key = path, key
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} does not exist")
    try:
      with zipfile.ZipFile(path) as z:
        names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        if key not in names:
          raise ValueError(f"{path} has no {key!r} array (it has {names}); "
                           f"expected {key} = uint8 images (N, H, W, 3)")
        with z.open(f"{key}.npy") as f:
          header = _read_header(f)
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path} is not an .npz file: {e}") from e
    if header is None:  # an unusual .npy version: read it whole
      arr = np.load(path)[key]
      header = (arr.shape, True, arr.dtype)
    self.shape, fortran, self.dtype = header
    self._stream = not fortran and not self.dtype.hasobject
    if self.dtype != np.uint8:
      raise ValueError(f"{path}: {key} has dtype {self.dtype}, expected "
                       f"uint8 images in [0, 255]")
    if len(self.shape) != 4 or self.shape[-1] != 3 or self.shape[0] == 0:
      raise ValueError(f"{path}: {key} has shape {self.shape}, expected "
                       f"(N, H, W, 3) with N > 0")

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    if not self._stream:
      arr = np.load(self.path)[self.key]
      for i in range(0, len(arr), batch_size):
        yield arr[i:i + batch_size]
      return
    per_image = int(np.prod(self.shape[1:]))
    with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
      _read_header(f)
      for i in range(0, len(self), batch_size):
        n = min(batch_size, len(self) - i)
        data = f.read(n * per_image)
        if len(data) != n * per_image:
          raise ValueError(f"{self.path}: {self.key} is truncated")
        yield np.frombuffer(data, np.uint8).reshape((n,) + self.shape[1:])


@functools.lru_cache(maxsize=None)
def _feature_fn(resize: str):
  """One jitted network per preprocessing mode (compiled once per shape)."""
  net = inception.InceptionV3()
  return jax.jit(lambda p, x: net.apply({"params": p},
                                        inception.preprocess(x, resize)))


@functools.lru_cache(maxsize=None)
def _dinov2_fn(model):
  """FD_DINOv2's features (EDM2, after dgm-eval): the class token of images
  resized to 224 x 224 with antialiasing."""
  return jax.jit(lambda p, x: {"dinov2": model.apply(
      {"params": p}, dinov2.preprocess(x, 224, antialias=True))["cls"]})


class BatchedFeatures:
  """Batched, jitted features of uint8 images: `fn(params, images)` -> dict.

  Every batch is padded to `batch_size`, so the network compiles once per
  image size. With a `mesh`, each batch is split over its batch axes (the
  batch size must divide over them) and, on several hosts, gathered back, so
  every host gets all features.
  """
  keys = ()

  def __init__(self, fn, params, batch_size: int = 100, mesh=None):
    self.mesh, self.batch_size = mesh, batch_size
    self._fn = fn
    if mesh is None:
      self.params = jax.device_put(params)
    else:
      self.params = jax.device_put(
          params, sharding.NamedSharding(mesh, sharding.P()))
      self._batch_sharding = sharding.batch_sharding(mesh)

  def _apply(self, images: np.ndarray):
    if self.mesh is None:
      return self._fn(self.params, images)
    with sharding.use_mesh(self.mesh):
      out = self._fn(self.params,
                     jax.device_put(images, self._batch_sharding))
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    return out

  def features(self, batch: np.ndarray, keys=None) -> dict[str, np.ndarray]:
    """Features of one uint8 image batch, `batch_size` images at a time;
    only those of the class's keys that are in `keys` (None: all)."""
    out = {k: [] for k in self.keys if keys is None or k in keys}
    for i in range(0, len(batch), self.batch_size):
      part = batch[i:i + self.batch_size]
      n = len(part)
      if n < self.batch_size:
        pad = np.zeros((self.batch_size - n,) + part.shape[1:], part.dtype)
        part = np.concatenate([part, pad])
      feats = self._apply(part)
      for k in out:  # float32; statistics() accumulates in float64
        out[k].append(np.asarray(feats[k][:n], np.float32))
    return {k: np.concatenate(v) for k, v in out.items()}

  def __call__(self, batches, keys=None) -> dict[str, np.ndarray]:
    """Features of an iterable of uint8 image batches (see `extract`)."""
    return extract(batches, [self], keys)


def extract(batches, extractors, keys=None) -> dict[str, np.ndarray]:
  """The features of every extractor from one pass over an iterable of
  uint8 image batches, consumed one at a time (each read and decoded once,
  whatever the number of networks); only `keys` (None: all) are kept."""
  out = {}
  for batch in batches:
    for extractor in extractors:
      for k, v in extractor.features(batch, keys).items():
        out.setdefault(k, []).append(v)
  return {k: np.concatenate(v) for k, v in out.items()}


class InceptionFeatures(BatchedFeatures):
  """ADM's Inception features: pool (FID, precision, recall), spatial
  (sFID) and logits (IS)."""
  keys = ("pool", "spatial", "logits")

  def __init__(self, params, batch_size: int = 100, resize: str = "adm",
               mesh=None):
    if resize not in inception.RESIZE_MODES:
      raise ValueError(f"resize must be one of {inception.RESIZE_MODES}")
    super().__init__(_feature_fn(resize), params, batch_size, mesh)


class DINOv2Features(BatchedFeatures):
  """FD_DINOv2's features of a DINOv2 (`convert_dinov2.load_dinov2`; EDM2
  uses dinov2_vitl14)."""
  keys = ("dinov2",)

  def __init__(self, model, params, batch_size: int = 100, mesh=None):
    # float32 matmuls in full (not TF32 on GPUs), as the Inception's and
    # torch's default: a metric should not move with the hardware.
    model = model.clone(dtype=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    super().__init__(_dinov2_fn(model), params, batch_size, mesh)


def _check_stats(mu, sigma, dim, what):
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"reference {what} statistics have shapes {mu.shape}, "
                     f"{sigma.shape}; expected ({dim},), ({dim}, {dim})")


def evaluate(samples: str, ref: str, inception_params, batch_size: int = 100,
             resize: str = "adm", num_splits: int = 10, k: int = 3,
             fid_method: str = "sqrtm", dinov2_encoder=None) -> dict:
  """All metrics of a sample .npz against an ADM reference .npz.

  fid_method: "sqrtm" (ADM's scipy.linalg.sqrtm) or "eigh" (faster, same
  value to ~1e-6; see scores.frechet_distance). dinov2_encoder: None, or
  (model, params) of a DINOv2 for "fd_dinov2", against the reference's
  mu_dinov2/sigma_dinov2 (`write_reference` with it) or its images.
  """
  reader = ImageBatchReader(samples)
  if not os.path.isfile(ref):
    raise FileNotFoundError(f"reference batch {ref} does not exist")
  ref_npz = np.load(ref)
  ref_keys = set(ref_npz.files)
  if not ({"mu", "sigma"} <= ref_keys or "arr_0" in ref_keys):
    raise ValueError(f"{ref} is not an ADM reference batch: it needs mu and "
                     f"sigma and/or arr_0 images, it has {sorted(ref_keys)}")
  networks = [InceptionFeatures(inception_params, batch_size, resize)]
  ref_networks = list(networks)
  ref_dinov2 = {"mu_dinov2", "sigma_dinov2"} <= ref_keys
  if dinov2_encoder is not None:
    networks.append(DINOv2Features(*dinov2_encoder, batch_size=batch_size))
    if not ref_dinov2:
      if "arr_0" not in ref_keys:
        raise ValueError(f"{ref} has neither mu_dinov2/sigma_dinov2 nor "
                         f"images for FD_DINOv2; write them with "
                         f"`--write_ref OUT --dinov2 ...` from real images")
      ref_networks.append(networks[-1])
  feats = extract(reader.batches(batch_size), networks)
  ref_feats = None
  if "arr_0" in ref_keys:
    ref_feats = extract(ImageBatchReader(ref).batches(batch_size),
                        ref_networks)

  result = {"num_samples": len(reader),
            "num_ref": None if ref_feats is None else len(ref_feats["pool"])}
  pool_dim, spatial_dim = feats["pool"].shape[1], feats["spatial"].shape[1]
  mu, sigma = scores.statistics(feats["pool"])
  if {"mu", "sigma"} <= ref_keys:
    ref_mu, ref_sigma = ref_npz["mu"], ref_npz["sigma"]
  else:
    ref_mu, ref_sigma = scores.statistics(ref_feats["pool"])
  _check_stats(ref_mu, ref_sigma, pool_dim, "pool (mu, sigma)")
  result["fid"] = scores.frechet_distance(mu, sigma, ref_mu, ref_sigma,
                                         method=fid_method)

  result["sfid"] = None
  if {"mu_s", "sigma_s"} <= ref_keys:
    ref_s = ref_npz["mu_s"], ref_npz["sigma_s"]
  elif ref_feats is not None:
    ref_s = scores.statistics(ref_feats["spatial"])
  else:
    ref_s = None
  if ref_s is not None:
    _check_stats(*ref_s, spatial_dim, "spatial (mu_s, sigma_s)")
    mu_s, sigma_s = scores.statistics(feats["spatial"])
    result["sfid"] = scores.frechet_distance(mu_s, sigma_s, *ref_s,
                                             method=fid_method)

  if dinov2_encoder is not None:
    ref_d = ((ref_npz["mu_dinov2"], ref_npz["sigma_dinov2"]) if ref_dinov2
             else scores.statistics(ref_feats["dinov2"]))
    _check_stats(*ref_d, feats["dinov2"].shape[1],
                 "DINOv2 (mu_dinov2, sigma_dinov2)")
    result["fd_dinov2"] = scores.frechet_distance(
        *scores.statistics(feats["dinov2"]), *ref_d, method=fid_method)
  result["inception_score"] = scores.inception_score(
      feats["logits"], min(num_splits, len(reader)))
  result["precision"] = result["recall"] = None
  if ref_feats is not None:
    result["precision"], result["recall"] = scores.precision_recall(
        ref_feats["pool"], feats["pool"], k=k)
  return result


def write_reference(images: str, out: str, inception_params,
                    batch_size: int = 100, resize: str = "adm",
                    dinov2_encoder=None) -> int:
  """Writes an ADM-style reference batch (mu, sigma, mu_s, sigma_s, arr_0;
  with `dinov2_encoder` also mu_dinov2, sigma_dinov2).

  For datasets without a published reference batch: `images` is an .npz
  with arr_0 uint8 (N, H, W, 3) real images. Returns N.
  """
  reader = ImageBatchReader(images)
  networks = [InceptionFeatures(inception_params, batch_size, resize)]
  if dinov2_encoder is not None:
    networks.append(DINOv2Features(*dinov2_encoder, batch_size=batch_size))
  feats = extract(reader.batches(batch_size), networks)
  stats = {}
  for key, suffix in (("pool", ""), ("spatial", "_s"), ("dinov2", "_dinov2")):
    if key in feats:
      stats.update(zip((f"mu{suffix}", f"sigma{suffix}"),
                       scores.statistics(feats[key])))
  arr = np.concatenate(list(reader.batches(batch_size)))
  tmp = out + ".tmp.npz"
  np.savez(tmp, arr_0=arr, **stats)
  os.replace(tmp, out)
  return len(reader)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m jdit.metrics.fid",
      description="FID, sFID, IS, precision and recall (ADM protocol).")
  parser.add_argument("--samples", required=True,
                      help=".npz with arr_0 uint8 (N, H, W, 3)")
  target = parser.add_mutually_exclusive_group(required=True)
  target.add_argument("--ref",
                      help="ADM reference batch, e.g. "
                           "VIRTUAL_imagenet256_labeled.npz")
  target.add_argument("--write_ref", metavar="OUT.npz",
                      help="instead of scoring, write --samples (real "
                           "images) as a reference batch with statistics")
  parser.add_argument("--inception", required=True,
                      help="local pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--dinov2", default=None,
                      help="also FD_DINOv2 (EDM2's metric) with this local "
                           "torch.hub DINOv2, e.g. "
                           "dinov2_vitl14_pretrain.pth")
  parser.add_argument("--batch_size", type=int, default=100)
  parser.add_argument("--resize", choices=inception.RESIZE_MODES,
                      default="adm")
  parser.add_argument("--fid_method", choices=("sqrtm", "eigh"),
                      default="sqrtm",
                      help="sqrtm: ADM's computation (default); eigh: the "
                           "same trace, much faster")
  args = parser.parse_args(argv)
  try:
    ImageBatchReader(args.samples)  # fail on bad samples before the work
    params = inception.load_inception(args.inception)
    encoder = None
    if args.dinov2:
      from jdit import convert_dinov2  # pylint: disable=g-import-not-at-top
      encoder = convert_dinov2.load_dinov2(args.dinov2)
    if args.write_ref:
      n = write_reference(args.samples, args.write_ref, params,
                          args.batch_size, args.resize,
                          dinov2_encoder=encoder)
      result = {"wrote": os.path.abspath(args.write_ref), "num_images": n}
    else:
      result = evaluate(args.samples, args.ref, params, args.batch_size,
                        args.resize, fid_method=args.fid_method,
                        dinov2_encoder=encoder)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
