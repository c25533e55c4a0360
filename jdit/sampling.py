"""Sampling from a model: noise -> images, labels, PNG grids.

Used by train.py (the grid written at the end of a run) and sample.py. Samples
are generated in fixed-size chunks; chunk c uses key fold_in(key(seed), c), so
an image depends only on the seed and its index, not on how many devices or
hosts produced it (each chunk is sharded over all devices of the mesh).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Any
import zipfile

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jdit import diffusion, feature_cache, sharding
from jdit.diffusion.guidance import check_guidance
from jdit.models import build_model

MODEL_KEYS_NOT_OVERRIDES = ("name",)


def model_from_config(config: ml_collections.ConfigDict):
  """Builds the model and its objective as the config describes them."""
  for key in ("model", "objective"):
    if key not in config:
      raise ValueError(f"config has no {key!r} entry")
  if "name" not in config.model:
    raise ValueError("config.model.name is missing (a build_model name)")
  objective_name = config.objective
  if objective_name not in diffusion.OBJECTIVES:
    raise ValueError(f"config.objective must be one of "
                     f"{diffusion.OBJECTIVES}, got {objective_name!r}")
  overrides = {k: v for k, v in config.model.items()
               if k not in MODEL_KEYS_NOT_OVERRIDES and v is not None}
  if overrides.get("learn_sigma") is None:
    overrides["learn_sigma"] = objective_name == "ddpm"
  # Lists after a JSON round trip.
  for key in ("input_size", "mixer_layers", "base_grid"):
    if isinstance(overrides.get(key), (list, tuple)):
      overrides[key] = tuple(overrides[key])
  for key in ("mixer_options", "mlp_options"):
    if key in overrides and not isinstance(overrides[key], dict):
      overrides[key] = dict(overrides[key])
  from jdit import repa  # pylint: disable=g-import-not-at-top
  overrides.update(repa.model_overrides(config))  # REPA's projector
  model = build_model(config.model.name, **overrides)
  objective = diffusion.create(objective_name, config.get("diffusion"),
                               learn_sigma=model.learn_sigma)
  return model, objective


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255], as the ADM evaluator expects."""
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def check_cfg(model, guidance, guide=None) -> None:
  """Classifier-free guidance needs the null class that label dropout
  trains; without it the unconditional branch would silently read another
  class's embedding."""
  if (check_guidance(guidance) is not None and guide is None
      and getattr(model, "class_dropout_prob", 1) == 0):
    raise ValueError("classifier-free guidance needs a model trained with "
                     "label dropout (a null class); this one has "
                     "class_dropout_prob=0. Guide it with a weaker model "
                     "instead (autoguidance: a guide checkpoint), or sample "
                     "with guidance scale 1")


# What a network's output means at a given time input, per objective: a
# guide must agree with the model it guides on all of it.
SAMPLING_MEANING = {"ddpm": ("num_timesteps", "beta_schedule"),
                    "flow": ("path", "prediction", "model_time_scale",
                             "model_time_flip")}


def check_guide(config, model, guide_config, guide_model) -> None:
  """Raises ValueError unless the guide network can stand in for the
  unconditional branch of `model` (autoguidance): same input shape, labels,
  objective and time convention."""
  problems = []
  if guide_config.objective != config.objective:
    problems.append(f"objective {guide_config.objective!r}, the model's is "
                    f"{config.objective!r}")
  else:
    section = config.objective
    ours = diffusion.create(section, config.get("diffusion"),
                            learn_sigma=False).config
    theirs = diffusion.create(section, guide_config.get("diffusion"),
                              learn_sigma=False).config
    problems += [f"diffusion.{section}.{k} {theirs[k]!r}, the model's is "
                 f"{ours[k]!r}" for k in SAMPLING_MEANING[section]
                 if theirs[k] != ours[k]]
  for key in ("input_shape", "num_classes"):
    if getattr(guide_model, key) != getattr(model, key):
      problems.append(f"{key} {getattr(guide_model, key)}, the model's is "
                      f"{getattr(model, key)}")
  if problems:
    raise ValueError("the guide network does not fit the model: "
                     + "; ".join(problems))


def save_grid(images: np.ndarray, path: str, ncol: int) -> None:
  """Writes (N, H, W, C) uint8 images as one PNG grid, ncol per row."""
  n, h, w, c = images.shape
  nrow = math.ceil(n / ncol)
  grid = np.zeros((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h,
         2 + col * (w + 2):2 + col * (w + 2) + w] = img
  if c == 1:
    grid = grid[..., 0]
  scale = max(1, 256 // max(h, w))  # make tiny digits visible
  image = Image.fromarray(grid)
  if scale > 1:
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale),
                         Image.NEAREST)
  image.save(path)


class Sampler:
  """Jitted sampling of one chunk; compiled once per (sampler, steps, cfg).

  ``cache`` (a ``feature_cache.FeatureCache`` with interval > 1) reuses the
  residual blocks' updates across network evaluations; None computes every
  block at every evaluation. ``guide``: None, or ``(model, params)`` of the
  network whose conditional output replaces the unconditional one under
  ``guidance`` (autoguidance; check it with ``check_guide``).
  """

  def __init__(self, model, objective, params, *, mesh, sampler=None,
               steps=None, guidance: diffusion.Guidance | None = None,
               decode=None, cache: feature_cache.FeatureCache | None = None,
               guide=None, **options):
    self.model = model
    self.objective = objective
    self.params = params
    self.mesh = mesh
    self.decode = decode
    sampler, steps, _ = objective.check_sampler(sampler, steps, options)
    self.sampler, self.steps = sampler, steps
    if cache is not None:
      cache.check_evaluations(objective.evaluations(sampler, steps))
    self.shape = model.input_shape
    guide_model, self.guide_params = guide or (None, None)
    check_cfg(model, guidance, guide)

    def run(params, guide_params, key, y):
      noise = jax.random.normal(jax.random.fold_in(key, 0),
                                (y.shape[0],) + self.shape)

      def model_fn(x, t, yy):
        return model.apply({"params": params}, x, t, yy)

      if cache is not None and cache.active:
        model_fn = feature_cache.CachedNetwork(model, params, cache)

      guide_fn = None if guide_model is None else (
          lambda x, t, yy: guide_model.apply({"params": guide_params}, x, t,
                                             yy))
      x = objective.sample(model_fn, noise, jax.random.fold_in(key, 1), y=y,
                           sampler=sampler, steps=steps, guidance=guidance,
                           guide_fn=guide_fn, **options)
      return decode(x) if decode is not None else x

    self._run = jax.jit(run)

  def __call__(self, key, labels: np.ndarray) -> np.ndarray:
    """Samples one chunk (labels host numpy, global) -> host float images."""
    bsh = sharding.batch_sharding(self.mesh)
    y = jax.device_put(jnp.asarray(labels, jnp.int32), bsh)
    with sharding.use_mesh(self.mesh):
      out = self._run(self.params, self.guide_params, key, y)
    return np.asarray(multihost_utils.process_allgather(
        out, tiled=True)) if jax.process_count() > 1 else np.asarray(out)


def generate_batches(sampler: Sampler, labels: np.ndarray, *, seed: int,
                     chunk: int, chunks=None):
  """Yields uint8 (n, H, W, C) samples of len(labels) labels, `chunk` at a
  time (the last one shorter), so that a caller holds one chunk at a time;
  `chunks`: only these chunk indices, in order (None: all).

  Chunk c draws its noise from fold_in(key(seed), c): the samples depend on
  the seed and the chunk size, not on the devices or the host count.
  """
  par = sharding.batch_parallelism(sampler.mesh)
  if chunk % par:
    raise ValueError(f"the sampling batch {chunk} must be divisible by the "
                     f"{par} devices it is split over")
  base = jax.random.key(seed)
  for c in range(-(-len(labels) // chunk)) if chunks is None else chunks:
    y = np.asarray(labels[c * chunk:(c + 1) * chunk])
    real = len(y)
    if real < chunk:  # pad the last chunk; keeps one compiled shape
      y = np.concatenate([y, np.zeros(chunk - real, y.dtype)])
    x = sampler(jax.random.fold_in(base, c), y)
    yield to_uint8(x[:real])


def generate(sampler: Sampler, labels: np.ndarray, *, seed: int,
             chunk: int) -> np.ndarray:
  """Samples len(labels) images in chunks of `chunk`; uint8 (N, H, W, C)."""
  return np.concatenate(list(generate_batches(sampler, labels, seed=seed,
                                              chunk=chunk)))


def generate_to_file(sampler: Sampler, labels: np.ndarray, out: str, *,
                     seed: int, chunk: int, identity: dict,
                     stop_after: int | None = None,
                     preview: int = 100) -> np.ndarray | None:
  """Samples into `out` (.npz: arr_0 uint8 images, arr_1 labels; the ADM
  evaluator's layout) so that an interrupted run resumes where it stopped.

  Each finished chunk is kept in `out + ".parts/"` beside a manifest of
  `identity` (what determines the images: checkpoint and step, sampler,
  guidance, ...), the seed, the chunk size and the labels. A later call with
  the same manifest samples only the missing chunks; since chunk c's noise
  depends only on (seed, c), the file equals that of an uninterrupted run.
  A different manifest is refused, never mixed. At the end the parts are
  streamed into the npz (50K 256px samples are never in memory at once) and
  removed. Only process 0 writes; every process samples every chunk.

  Returns the first `preview` images (for a grid), or None when stopped by
  `stop_after` (chunks sampled in this call; for tests of resumption).
  """
  parts = out + ".parts"
  total = -(-len(labels) // chunk)
  manifest = {"identity": identity, "seed": seed, "chunk": chunk,
              "num_samples": len(labels),
              "labels_sha1": hashlib.sha1(np.ascontiguousarray(
                  labels, np.int64).tobytes()).hexdigest()}
  done, problem = np.zeros(total, bool), ""
  if jax.process_index() == 0:
    done, problem = _resume(parts, manifest, total)
  if jax.process_count() > 1:  # every host must skip the same chunks
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if np.asarray(multihost_utils.broadcast_one_to_all(bool(problem))):
      problem = problem or "process 0 refused the existing parts directory"
  if problem:
    raise ValueError(problem)
  todo = [c for c in range(total) if not done[c]]
  if stop_after is not None:
    todo = todo[:stop_after]
  batches = generate_batches(sampler, labels, seed=seed, chunk=chunk,
                             chunks=todo)
  for c, images in zip(todo, batches):
    if jax.process_index() == 0:
      np.save(os.path.join(parts, f".tmp{c}.npy"), images)
      os.replace(os.path.join(parts, f".tmp{c}.npy"),
                 os.path.join(parts, f"{c:06d}.npy"))
  if len(todo) < int(np.sum(~done)):
    return None
  if jax.process_index() != 0:
    return None
  shards = [os.path.join(parts, f"{c:06d}.npy") for c in range(total)]
  first = np.load(shards[0], mmap_mode="r")
  shape = (len(labels),) + first.shape[1:]
  head = np.concatenate([np.load(p) for p in shards[:-(-preview // chunk)]]
                        or [np.zeros((0,) + shape[1:], np.uint8)])
  tmp = out + ".tmp.npz"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
    with z.open("arr_0.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(f, {
          "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
          "fortran_order": False, "shape": shape})
      for path in shards:
        f.write(np.ascontiguousarray(np.load(path)).tobytes())
    with z.open("arr_1.npy", "w") as f:
      np.lib.format.write_array(f, np.asarray(labels))
  os.replace(tmp, out)  # never a half-written samples file
  shutil.rmtree(parts)
  return head[:preview]


def _resume(parts: str, manifest: dict, total: int) -> tuple[np.ndarray, str]:
  """(chunks already in `parts`, "" or why they cannot be used)."""
  path = os.path.join(parts, "manifest.json")
  done = np.zeros(total, bool)
  manifest = json.loads(json.dumps(manifest))  # tuples read back as lists
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old != manifest:
      keys = sorted(k for k in set(old) | set(manifest)
                    if old.get(k) != manifest.get(k))
      changed = [k for k in keys if k != "identity"] + [
          f"identity.{k}" for k in sorted(
              set(old.get("identity", {})) | set(manifest["identity"]))
          if old.get("identity", {}).get(k) != manifest["identity"].get(k)]
      return done, (f"{parts} holds samples of another run (differs in "
                    f"{', '.join(changed)}); delete it or sample with the "
                    f"same arguments to resume")
    for c in range(total):
      done[c] = os.path.isfile(os.path.join(parts, f"{c:06d}.npy"))
  else:
    os.makedirs(parts, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
  return done, ""


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes), per_class).astype(np.int32)


def check_labels(labels: Any, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                     f"{labels.shape}")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"labels must be in [0, {num_classes}), got "
                     f"{sorted(set(bad.tolist()))[:10]}")
  return labels.astype(np.int32)
