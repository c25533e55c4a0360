"""CLEAR's training set: samples the teacher generates once, then reuses.

Used by jdit.distill when `config.distill.num_samples` > 0. The set is
stored in the workdir (atomically, with the settings that made it), so a
resumed run reads it back instead of sampling again.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from jdit import data, diffusion, sampling, sharding

DATA_FILE = "distill_samples.npz"


class _ArraySource:
  """In-memory random-access source for data.InputPipeline."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    self.x, self.y = x, y

  def __len__(self):
    return len(self.x)

  def __getitems__(self, indices):
    return [{"x": self.x[i], "y": self.y[i]} for i in indices]


def _sample_meta(config, teacher_path: str) -> dict:
  d = config.distill
  return {"teacher": os.path.abspath(os.path.expanduser(teacher_path)),
          "num_samples": int(d.num_samples), "sampler": d.sampler,
          "steps": int(d.steps), "cfg_scale": float(d.cfg_scale),
          "seed": int(config.seed)}


def teacher_samples(config, teacher, objective, params, mesh, workdir
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The teacher-generated training set: made once, kept in the workdir.

  Returns (x float32 (N, H, W, C) in the model's input space, y int32 (N,)).
  Labels are balanced over the classes; x is not quantised, so latent
  models distill on latents.
  """
  path = os.path.join(workdir, DATA_FILE)
  meta = _sample_meta(config, config.distill.teacher)
  if os.path.exists(path):
    with np.load(path) as f:
      stored = json.loads(str(f["meta"]))
      if stored != meta:
        raise ValueError(
            f"{path} was generated with {stored}, but the config asks for "
            f"{meta}; use another workdir or delete the file to regenerate")
      return f["x"], f["y"]
  d = config.distill
  n = int(d.num_samples)
  if n < config.batch_size:
    raise ValueError(f"config.distill.num_samples={n} must be >= "
                     f"batch_size={config.batch_size}")
  par = sharding.batch_parallelism(mesh)
  chunk = -(-int(d.sample_batch or config.batch_size) // par) * par
  sampler = sampling.Sampler(
      teacher, objective, params, mesh=mesh, sampler=d.sampler or None,
      steps=d.steps or None, guidance=diffusion.Guidance(
          scale=float(d.cfg_scale), null_label=teacher.num_classes))
  y = (np.arange(n) % teacher.num_classes).astype(np.int32)
  base = jax.random.fold_in(jax.random.key(config.seed), 0x5eed)
  xs = []
  for c, start in enumerate(range(0, n, chunk)):
    yc = y[start:start + chunk]
    pad = np.zeros(chunk - len(yc), np.int32)  # one compiled shape
    x = sampler(jax.random.fold_in(base, c), np.concatenate([yc, pad]))
    xs.append(np.asarray(x[:len(yc)], np.float32))
  x = np.concatenate(xs)
  if not np.all(np.isfinite(x)):
    raise FloatingPointError("the teacher generated non-finite samples; "
                             "check the teacher checkpoint and cfg_scale")
  if jax.process_index() == 0:  # atomic: a killed run leaves no half file
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=x, y=y, meta=json.dumps(meta))
    os.replace(tmp, path)
  return x, y


def pipeline(config, student, teacher, objective, params, mesh, workdir
             ) -> data.InputPipeline:
  """Batches of the teacher-generated training set, shaped for `student`."""
  x, y = teacher_samples(config, teacher, objective, params, mesh, workdir)
  h, w = student.grid_shape
  spec = data.DatasetSpec(
      builder="distill", num_classes=student.num_classes,
      shape=(h * student.patch_size, w * student.patch_size,
             student.in_channels),
      to_model=lambda b: (b["x"], b["y"].astype(np.int32)))
  return data.InputPipeline(
      _ArraySource(x, y), spec, global_batch_size=config.batch_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
