"""Encode an image dataset once with the SD-VAE into a latent TFDS dataset.

  python -m jdit.data.extract_latents --source folder \\
      --folder /data/imagenet/train --image_size 256 \\
      --vae /ckpt/sd-vae-ft-ema --out /data/latents/in256
  python -m jdit.data.extract_latents --source imagenet2012 \\
      --data_dir ~/tensorflow_datasets --image_size 256 \\
      --vae /ckpt/sd-vae-ft-ema --out /data/latents/in256

A folder's labels are its class subdirectories, or with --labels none
there are none (one class, every image at any depth: FFHQ, CelebA-HQ).
Neither source needs TensorFlow; a TFDS one must be prepared as ArrayRecord
(jdit.data.prepare_imagenet builds imagenet2012 that way from the ILSVRC2012
tars). Images get ADM's centre crop (jdit.data.imagenet); with --flip both
(the default, as fast-DiT does) each image is stored twice, as example 2i and
its horizontal mirror as example 2i + 1, so training needs no flips of its
own.
Each example holds the posterior's mean and std (jdit.data.latents), with
--store_images also its uint8 image (REPA's encoder input), and
latent_stats.json beside the dataset records per-channel statistics.

The encoder is jitted and each batch is sharded over this host's devices.
On several hosts (the same command on each, after jax.distributed starts),
host h encodes the h-th contiguous slice of the images into --out.tmp, which
must be on a shared filesystem; host 0 then writes the TFDS metadata and
renames --out.tmp to --out. Nothing half-written ever sits at --out.
A stopped run (preempted, killed) resumes where it stopped when the same
command is run again: every closed shard is kept (jdit.data.latent_shards).

With --buckets (jdit.data.buckets) each image goes to the aspect-ratio
bucket nearest its own and --out holds one such dataset per bucket,
--out/<h>x<w>/, listed in --out/buckets.json.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdit.data import buckets, imagenet, latent_shards, latents

SHARD_PREFIX = f"{latents.DATASET_NAME}-{{split}}.array_record"
# Flags a resumed run may change: they do not change what is written, but
# for the last bits of the latents with --batch_size (XLA picks the conv
# algorithm per batch shape).
_NOT_FINGERPRINTED = ("out", "batch_size", "workers", "overwrite",
                      "restart")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m jdit.data.extract_latents",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--source", required=True,
                 help="'folder' (root/<class>/*.JPEG) or a TFDS image "
                 "dataset name such as imagenet2012 (prepared as ArrayRecord)")
  p.add_argument("--data_dir", default="", help="TFDS data dir (TFDS source)")
  p.add_argument("--folder", default="", help="image folder root (folder)")
  p.add_argument("--labels", choices=imagenet.LABEL_SOURCES, default="dirs",
                 help="folder: labels from class subdirectories, or 'none' "
                 "(every image at any depth, one class: unconditional)")
  p.add_argument("--split", default="train")
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--vae", required=True,
                 help="jdit.vae.load_vae path: converted dir, diffusers dir "
                 "or weight file")
  p.add_argument("--out", required=True, help="output dataset directory")
  p.add_argument("--batch_size", type=int, default=64,
                 help="rows per encoder call (flipped copies included)")
  p.add_argument("--flip", choices=("both", "none"), default="both")
  p.add_argument("--dtype", choices=("float16", "float32"),
                 default="float16", help="storage dtype of the moments")
  p.add_argument("--vae_dtype", choices=("float32", "bfloat16"),
                 default="float32", help="encoder compute dtype")
  p.add_argument("--examples_per_shard", type=int, default=10_000)
  p.add_argument("--workers", type=int, default=16, help="decode threads")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out")
  p.add_argument("--restart", action="store_true",
                 help="discard an unfinished run in --out.tmp instead of "
                 "resuming it")
  p.add_argument("--buckets", default="",
                 help="aspect-ratio buckets (jdit.data.buckets): 'auto' "
                 "(area --image_size^2, see --max_aspect, --bucket_step) or "
                 "HEIGHTxWIDTH,... in pixels; each image is cropped to the "
                 "bucket nearest its aspect ratio, one dataset per bucket")
  p.add_argument("--max_aspect", type=float, default=2.0,
                 help="auto buckets: the widest and tallest ratio")
  p.add_argument("--bucket_step", type=int, default=0,
                 help="auto buckets: sides are multiples of this many pixels "
                 "(default twice the VAE's factor: even latent sides)")
  p.add_argument("--store_images", action="store_true",
                 help="also store each (cropped, flipped) uint8 image, for "
                      "REPA's encoder (--image_size^2 x 3 bytes an example)")
  return p.parse_args(argv)


def make_encoder(module, params, devices=None):
  """Jitted images (B, H, W, 3) in [-1, 1] -> (mean, std), B split over the
  local devices; returns (encode, rows_multiple)."""
  devices = list(devices or jax.local_devices())
  mesh = Mesh(np.asarray(devices), ("batch",))
  rows, whole = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  params = jax.device_put(params, whole)

  @jax.jit
  def _encode(p, x):
    mean, logvar = module.apply({"params": p}, x, method="encode")
    return mean, jnp.exp(0.5 * logvar)

  def encode(x: np.ndarray):
    return _encode(params, jax.device_put(x, rows))

  return encode, len(devices)


def _prefetch(iterator, size: int = 2):
  """Runs `iterator` in a thread, `size` items ahead (decode || encode)."""
  q: queue.Queue = queue.Queue(size)
  done = object()

  def work():
    try:
      for item in iterator:
        q.put(item)
      q.put(done)
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  threading.Thread(target=work, daemon=True).start()
  while (item := q.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item


def _copies(args) -> int:
  """Examples stored per image: with --flip both, the image and its mirror."""
  return 2 if args.flip == "both" else 1


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _assign(source, shapes, tmp: str, host: int, hosts: int) -> np.ndarray:
  """Bucket index of every image; each host reads its slice's headers."""
  part = imagenet.host_slice(len(source), host, hosts)
  sizes = source.sizes(range(part.start, part.stop))
  if hosts > 1:
    np.save(os.path.join(tmp, f"sizes{host:05d}.npy"), sizes)
    _sync("extract_latents_sizes")
    sizes = np.concatenate([np.load(os.path.join(tmp, f"sizes{h:05d}.npy"))
                            for h in range(hosts)])
  return buckets.nearest_bucket(sizes, shapes)


def extract(args: argparse.Namespace) -> dict:
  """Runs the extraction described by `args` (see parse_args); returns the
  statistics written to latent_stats.json, or with --buckets those of
  buckets.json (on host 0; {} elsewhere)."""
  host, hosts = jax.process_index(), jax.process_count()
  out = os.path.abspath(os.path.expanduser(args.out))
  tmp = out + ".tmp"
  if os.path.exists(out) and not args.overwrite:
    raise FileExistsError(f"--out {out} exists; pass --overwrite to replace "
                          f"it or choose another directory")
  try:
    from jdit import vae as vae_lib  # pylint: disable=g-import-not-at-top
    module, params, scale = vae_lib.load_vae(
        args.vae, dtype=jnp.dtype(args.vae_dtype))
  except Exception as e:  # any load failure: name the file
    raise ValueError(f"cannot load the VAE from --vae {args.vae!r}: "
                     f"{type(e).__name__}: {e}") from e
  f = module.downsample_factor
  if args.image_size < f or args.image_size % f:
    raise ValueError(f"--image_size {args.image_size} must be a positive "
                     f"multiple of the VAE's downsampling factor {f}")
  copies = _copies(args)
  if args.examples_per_shard < 1 or args.examples_per_shard % copies:
    raise ValueError(f"--examples_per_shard must be a positive multiple of "
                     f"{copies} (--flip {args.flip}: an image and its mirror "
                     f"share a shard), got {args.examples_per_shard}")
  shapes = buckets.from_flags(args.buckets, args.image_size, args.bucket_step,
                             args.max_aspect, f) if args.buckets else None
  source = imagenet.open_source(
      args.source, data_dir=args.data_dir, folder=args.folder,
      split=args.split, image_size=args.image_size, workers=args.workers,
      labels=args.labels)
  fingerprint = {k: v for k, v in vars(args).items()
                 if k not in _NOT_FINGERPRINTED}
  fingerprint.update(hosts=hosts, num_images=len(source))
  fresh = latent_shards.check_run(tmp, fingerprint, args.restart) == "fresh"
  if host == 0 and fresh:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    latent_shards.start_run(tmp, fingerprint)
  _sync("extract_latents_start")
  if shapes is None:
    jobs = [("", source)]
  else:  # one dataset per bucket that got images, in tmp/<h>x<w>
    assigned = _assign(source, shapes, tmp, host, hosts)
    jobs = [(buckets.bucket_name(shape),
             source.subset(np.flatnonzero(assigned == b), shape))
            for b, shape in enumerate(shapes) if np.any(assigned == b)]
  encoder = make_encoder(module, params)
  for name, part in jobs:
    _encode_into(args, part, os.path.join(tmp, name), host, hosts, module,
                 encoder)
  _sync("extract_latents_written")
  stats = {}
  if host == 0:
    for h in range(hosts if shapes is not None and hosts > 1 else 0):
      os.remove(os.path.join(tmp, f"sizes{h:05d}.npy"))
    stats = {name: _finalize(args, os.path.join(tmp, name), hosts, module,
                             part, bucketed=shapes is not None)
             for name, part in jobs}
    if shapes is None:
      stats = stats[""]
    else:
      stats = {"source": args.source, "folder": args.folder,
               "split": args.split, "num_images": len(source),
               "buckets": [{"name": name, **{k: stats[name][k] for k in (
                   "image_size", "latent_shape", "num_images",
                   "num_examples")}} for name, _ in jobs]}
      with open(os.path.join(tmp, buckets.BUCKETS_FILE), "w") as fh:
        json.dump(stats, fh, indent=2)
    latent_shards.remove_run_files(
        tmp, [os.path.join(tmp, name) for name, _ in jobs])
    _publish(tmp, out)
  _sync("extract_latents_done")
  return stats


def _encode_into(args, source, directory, host, hosts, module, encoder):
  """Encodes this host's slice of `source` into shards in `directory`, and
  their lengths and moment sums into directory/host<h>.json; continues a
  stopped run's shards there."""
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(latent_shards.done_path(directory, host)):
    return  # this host's part of this dataset was finished before a stop
  f = module.downsample_factor
  height, width = source.crop_shape
  shape = (height // f, width // f, module.latent_channels)
  image_shape = (height, width, 3) if args.store_images else None
  feats = latents.features(shape, source.classes, np.dtype(args.dtype),
                           image_shape=image_shape)
  copies = _copies(args)
  encode, ndev = encoder
  step = -(-max(args.batch_size, copies) // (ndev * copies)) * ndev * copies
  writer = latent_shards.ShardWriter(directory, host, feats,
                                     args.examples_per_shard, shape[-1])
  skip = writer.examples_written // copies  # images in closed shards
  pending = None

  def drain(result):
    (mean, std), labels, n, images = result
    mean = np.asarray(mean[:n], np.float32)  # blocks on the device
    std = np.asarray(std[:n], np.float32)
    # Per example: sum of mean, of mean^2 and of std^2 over positions.
    m64, s64 = mean.astype(np.float64), std.astype(np.float64)
    sums = np.stack([m64.sum((1, 2)), np.square(m64).sum((1, 2)),
                     np.square(s64).sum((1, 2))], 1)
    m, s = mean.astype(args.dtype), std.astype(args.dtype)
    for i in range(n):
      example = {"latent_mean": m[i], "latent_std": s[i],
                 "label": int(labels[i // copies])}
      if images is not None:
        example["image"] = images[i]
      writer.write(example, sums[i])

  import tqdm  # pylint: disable=g-import-not-at-top
  part = imagenet.host_slice(len(source), host, hosts)
  bar = tqdm.tqdm(total=part.stop - part.start, initial=skip, unit="img",
                  disable=host != 0, desc=f"encode {height}x{width}px")
  for images, labels in _prefetch(source.batches(step // copies, host,
                                                 hosts, skip=skip)):
    rows = images
    if copies == 2:  # example 2i is image i, 2i + 1 its mirror
      rows = np.stack([images, imagenet.hflip(images)], 1).reshape(
          (-1,) + images.shape[1:])
    n = len(rows)
    kept = rows if args.store_images else None
    rows = np.pad(imagenet.to_float(rows),
                  ((0, step - n), (0, 0), (0, 0), (0, 0)))
    result = (encode(rows), labels, n, kept)  # async: overlaps the drain
    if pending is not None:
      drain(pending)
    pending = result
    bar.update(len(images))
  if pending is not None:
    drain(pending)
  bar.close()
  writer.close(shape=list(shape), image_shape=image_shape)


def _finalize(args, directory, hosts, module, source, bucketed) -> dict:
  """Host 0: names the shards in `directory` as TFDS does, writes metadata
  and latent_stats.json; returns the statistics. Repeatable: a run stopped
  here does it again on resuming."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  lengths, sums, parts = [], 0.0, []
  for h in range(hosts):
    info = latent_shards.read_json(latent_shards.done_path(directory, h))
    parts += [(h, k) for k in range(len(info["lengths"]))]
    lengths += info["lengths"]
    sums = sums + np.asarray(info["sums"])
  shape = tuple(info["shape"])
  feats = latents.features(shape, source.classes, np.dtype(args.dtype),
                           image_shape=info["image_shape"])
  prefix = SHARD_PREFIX.format(split=args.split)
  for i, (h, k) in enumerate(parts):
    renamed = os.path.join(directory, f"{prefix}-{i:05d}-of-{len(parts):05d}")
    shard = latent_shards.shard_path(directory, h, k)
    if os.path.exists(shard) or not os.path.exists(renamed):
      os.rename(shard, renamed)  # else renamed before a stop
  total = sum(lengths)
  size = list(source.crop_shape) if bucketed else args.image_size
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=feats, check_data=False,
      split_infos=[tfds.core.SplitInfo(name=args.split, shard_lengths=lengths,
                                       num_bytes=0)],
      description=f"VAE latent moments of {args.source} "
      f"({size}px), written by jdit.data.extract_latents.")
  count = total * shape[0] * shape[1]
  mean = sums[0] / count
  std = np.sqrt(np.maximum(sums[1] / count - mean ** 2 + sums[2] / count, 0))
  scale = module.scale_factor
  # What the diffusion model sees: per-channel normalised (VA-VAE), scaled.
  shift, divisor = 0.0, 1.0
  if module.latents_mean is not None:
    shift = np.asarray(module.latents_mean, np.float64)
    divisor = np.asarray(module.latents_std, np.float64)
  stats = {
      "source": args.source, "folder": args.folder, "split": args.split,
      "image_size": size, "latent_shape": list(shape),
      "num_examples": total, "num_images": len(source),
      "flip": args.flip, "num_classes": source.num_classes,
      "images": bool(args.store_images),
      "vae": args.vae, "scale_factor": float(scale), "dtype": args.dtype,
      "latents_mean": _list_or_none(module.latents_mean),
      "latents_std": _list_or_none(module.latents_std),
      # Statistics of z = mean + std * eps, unscaled, over all examples and
      # positions; scaled_* are of what the model sees (after the VAE's
      # per-channel normalisation, if any, and scale_factor).
      "channel_mean": mean.tolist(), "channel_std": std.tolist(),
      "channel_posterior_std": np.sqrt(sums[2] / count).tolist(),
      "scaled_channel_mean": ((mean - shift) / divisor * scale).tolist(),
      "scaled_channel_std": (std / divisor * scale).tolist(),
  }
  with open(os.path.join(directory, latents.STATS_FILE), "w") as fh:
    json.dump(stats, fh, indent=2)
  return stats


def _publish(tmp: str, out: str) -> None:
  """Moves the finished dataset to `out` (--overwrite: swap, then drop the
  old one), so nothing half-written ever sits at `out`."""
  if os.path.exists(out):
    old = out + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
  else:
    os.rename(tmp, out)


def _list_or_none(values):
  return None if values is None else [float(v) for v in values]


def main(argv=None) -> None:
  from jdit import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  stats = extract(parse_args(argv))
  if stats:
    print(json.dumps(stats["buckets"] if "buckets" in stats else {
        k: stats[k] for k in ("num_examples", "latent_shape", "scale_factor",
                              "scaled_channel_std")}), file=sys.stderr)


if __name__ == "__main__":
  main()
