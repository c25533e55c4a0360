"""The training loop: config + workdir -> checkpoints, metrics, sample grids.

`run(config, workdir)` resumes from the newest checkpoint in the workdir, so
re-running the same command continues exactly where the last run stopped: the
data position is the step, and every random number is derived from the seed
and the step (fold_in), never from hidden state.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jdit import (checkpoint, data, depth_prune, diffusion, distill,
                  evaluation, posthoc_ema, preemption, repa, sampling,
                  sharding)
from jdit import train_state as ts

REQUIRED_KEYS = ("seed", "batch_size", "total_steps", "log_every",
                 "checkpoint_every", "objective", "model", "data", "optim",
                 "ema_decay", "mesh")


def validate_config(config: ml_collections.ConfigDict) -> None:
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise ValueError(f"config is missing keys {missing}; see configs/default.py")
  for key in ("batch_size", "total_steps", "log_every", "checkpoint_every"):
    value = config[key]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key} must be a positive integer, got "
                       f"{value!r}")
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f"config.ema_decay must be in [0, 1), got "
                     f"{config.ema_decay}")
  accum = config.optim.get("grad_accum", 1)
  if accum < 1 or config.batch_size % accum:
    raise ValueError(f"config.optim.grad_accum={accum} must be >= 1 and "
                     f"divide batch_size={config.batch_size}")
  evaluation.validate_config(config)
  if posthoc_ema.gammas_from_config(config) and distill.enabled(config):
    raise ValueError("config.posthoc_ema and config.distill cannot be used "
                     "together; set config.posthoc_ema.every=0")
  repa.validate(config)
  if repa.enabled(config) and distill.enabled(config):
    raise ValueError("config.repa and config.distill cannot be used "
                     "together; set config.repa.weight=0")
  if depth_prune.enabled(config):  # the search trains a masked model
    clashes = [name for name, on in (
        ("config.distill.teacher", distill.enabled(config)),
        ("config.repa.weight", repa.enabled(config)),
        ("config.posthoc_ema.every", posthoc_ema.gammas_from_config(config)),
        ("config.eval.every", evaluation.enabled(config))) if on]
    if clashes:
      raise ValueError(f"config.depth_prune (a layer search) runs alone; "
                       f"turn off {clashes}")


class MetricWriter:
  """metrics.jsonl + TensorBoard events; only process 0 writes."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    # Drop rows logged after the checkpoint we resume from: they are redone.
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [l for l in f if l.strip()
                and json.loads(l).get("step", 0) <= resume_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(rows)
      os.replace(self.path + ".tmp", self.path)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in scalars.items():
      self.tb.add_scalar(k, float(v), step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.tb.close()


def _restore_or_init(mngr, model, tx, mesh, rules, config, num_posthoc,
                     search=None):
  step = mngr.latest_step()
  if step is None:
    state = ts.create_state(model, tx, mesh, rules, config.seed, num_posthoc)
    if search is not None:  # the model to prune
      state = search.init(state)
    elif distill.init_path(config):  # a fine-tune starts from those weights
      state = distill.init_from(state, distill.init_path(config))
    return state, 0
  # Resuming: restore straight into the sharded layout, initialising nothing.
  abstract = ts.abstract_state(model, tx, mesh, rules, num_posthoc)
  items = checkpoint.ARRAY_ITEMS + (("posthoc_ema",) if num_posthoc else ())
  target = {k: getattr(abstract, k) for k in items}
  try:
    out = checkpoint.restore(mngr, step, target)
  except Exception as e:  # orbax raises many types for mismatched trees
    raise ValueError(
        f"the checkpoint at step {step} in {mngr.directory} does not fit "
        f"model {config.model.name!r} as configured (was it written for "
        f"another model or optimizer, or with another "
        f"config.posthoc_ema?): {e}") from e
  # The step counter placed as the train step returns it: an uncommitted
  # scalar would make the first step after a resume compile twice.
  counter = jax.device_put(jnp.asarray(step, jnp.int32),
                           sharding.NamedSharding(mesh, sharding.P()))
  state = ts.TrainState(step=counter,
                        params=out["params"], ema_params=out["ema_params"],
                        opt_state=out["opt_state"],
                        posthoc_ema=tuple(out.get("posthoc_ema", ())))
  return state, int(out["meta"]["data_step"])


def run(config: ml_collections.ConfigDict, workdir: str,
        stop_at: int | None = None, devices=None) -> dict:
  """Trains as configured, resuming from `workdir`; returns final metrics.

  Args:
    config: see configs/default.py.
    workdir: checkpoints, metrics.jsonl, TensorBoard events, sample grids.
    stop_at: stop after this step (checkpointing it) as if interrupted;
      a later run() with the same config resumes and continues exactly.
    devices: the devices to build the mesh from (default: all of them).
  """
  validate_config(config)
  sharding.maybe_initialize_distributed()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  model, objective = sampling.model_from_config(config)
  spec = data.get_spec(config.data.name, config.data.data_dir)
  bucket_models = _bucket_models(model, spec, config)
  if spec.num_classes != model.num_classes or (
      not bucket_models and spec.shape != model.input_shape):
    raise ValueError(
        f"dataset {config.data.name!r} has {spec.num_classes} classes of "
        f"shape {spec.shape}, but the model expects {model.num_classes} "
        f"classes of shape {model.input_shape} (config.model.*)")
  mesh = sharding.create_mesh(config.mesh, devices=devices,
                              dcn=config.get("mesh_dcn"))
  rules = sharding.rules_from_config(config.get("axis_rules"))
  par = sharding.batch_parallelism(mesh)
  accum = config.optim.get("grad_accum", 1)
  if (config.batch_size // accum) % par:
    raise ValueError(f"batch_size {config.batch_size} / grad_accum {accum} "
                     f"must be divisible by the {par} devices of the batch "
                     f"axes {sharding.BATCH_AXES} of mesh {dict(mesh.shape)}")
  # Loads the reference statistics and Inception weights now: a bad
  # config.eval fails here, before any training compute.
  evaluator = (evaluation.Evaluator(config, model, objective, mesh)
               if evaluation.enabled(config) else None)
  # The encoder loads now: a bad path fails before any training compute.
  encoder = repa.load_encoder(config, model) if repa.enabled(config) else None
  tx, schedule = ts.make_optimizer(config.optim, config.total_steps)
  distiller = (distill.Distiller(config, model, objective)
               if distill.enabled(config) else None)
  search = (depth_prune.LayerSearch(config, model, objective)
            if depth_prune.enabled(config) else None)
  # A distillation or a layer search brings its optimizer masking, input
  # and train step.
  special = distiller or search
  if special:
    tx = special.optimizer(tx)
  mngr = checkpoint.manager(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR),
                            keep=config.get("keep_checkpoints", 3))
  gammas = posthoc_ema.gammas_from_config(config)
  state, start = _restore_or_init(
      mngr, search.state_model if search else model, tx, mesh, rules, config,
      len(gammas), search)

  def dataset(images: bool = False):
    source = data.load_source(config.data.name, config.data.split,
                              config.data.data_dir)
    pipeline = data.make_pipeline(
        source, spec, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        flip=config.data.flip, images=images)
    for shape, size in getattr(pipeline, "skipped", ()):
      print(f"bucket {shape[0]}x{shape[1]} skipped: its {size} examples are "
            f"fewer than one batch of {config.batch_size}")
    return pipeline

  if special:
    pipeline, train_step = special.prepare(state, tx, mesh, rules, workdir,
                                           dataset)
  else:
    # REPA on a latent model reads the images stored beside the latents.
    pipeline = dataset(images=encoder is not None
                       and repa.needs_stored_images(spec.shape[-1]))
    repa_kw = lambda m: {} if encoder is None else dict(
        apply_fn=repa.make_apply_fn(m, float(config.repa.weight)),
        target_fn=repa.make_target_fn(encoder[0], m))
    # One compiled step per input shape: aspect-ratio buckets each run the
    # model at their own token grid (the parameters are shared; REPA's
    # encoder sees the bucket's image at its grid x 14 pixels).
    step_fns = {}
    frozen = None if encoder is None else jax.device_put(
        encoder[1], sharding.NamedSharding(mesh, sharding.P()))

    def train_step(st, batch):
      shape = tuple(batch["x"].shape[1:])
      if shape not in step_fns:
        shaped = bucket_models.get(shape, model)
        step_fns[shape] = ts.make_train_step(
            shaped, objective, tx,
            ema_decay=config.ema_decay, grad_accum=accum, seed=config.seed,
            mesh=mesh, rules=rules, ema_warmup=config.get("ema_warmup", False),
            posthoc_gammas=gammas, **repa_kw(shaped))
      return step_fns[shape](st, batch, frozen)
  writer = MetricWriter(workdir, start)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  meta = {"seed": config.seed, "config": checkpoint.config_to_dict(config)}
  snapshots = (posthoc_ema.snapshot_manager(workdir) if state.posthoc_ema
               else None)
  best = (checkpoint.BestCheckpoint(workdir)
          if evaluator is not None and config.eval.get("keep_best", True)
          else None)
  window, t0, last = [], time.time(), {}
  bar = tqdm.tqdm(total=config.total_steps, initial=start, desc="train",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  step = start
  end = config.total_steps if stop_at is None else min(stop_at,
                                                        config.total_steps)
  with sharding.use_mesh(mesh, rules), preemption.Preemption() as notice:
    while step < end:
      batch = sharding.global_batch(pipeline.batch(step), mesh)
      state, metrics = train_step(state, batch)
      window.append(metrics)
      step += 1
      bar.update(1)
      evaluate = evaluator is not None and evaluator.due(step)
      log = (step % config.log_every == 0 or step == config.total_steps
             or evaluate)  # eval metrics share the row of the step's loss
      if log:
        host = jax.device_get(window)
        last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        _check_finite(last["loss"], step, mngr)
        rate = len(window) / (time.time() - t0)
        last.update(lr=float(schedule(step - 1)), steps_per_sec=rate,
                    images_per_sec=rate * config.batch_size)
        if search is not None:
          last.update(search.metrics(state))
        bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{rate:.2f}")
        window, t0 = [], time.time()
      stop = step < end and notice.reached(step)  # SIGTERM: preempted
      if step % config.checkpoint_every == 0 or step == end or stop:
        if window:  # never checkpoint a NaN state
          _check_finite(float(jax.device_get(window[-1]["loss"])), step, mngr)
        checkpoint.save(mngr, step, params=state.params,
                        ema_params=state.ema_params, opt_state=state.opt_state,
                        meta={**meta, "step": step, "data_step": step},
                        posthoc_ema=state.posthoc_ema)
      if snapshots and (step % config.posthoc_ema.every == 0
                        or step == config.total_steps):
        posthoc_ema.save_snapshot(snapshots, step, state.posthoc_ema,
                                  config.posthoc_ema.sigma_rels, meta["config"])
      if evaluate:  # after the checkpoint: a failing eval loses no training
        last.update(evaluator(state.ema_params))
        if best is not None:
          best.offer(step, last["eval/fid"], state.ema_params,
                     {**meta, "data_step": step})
        bar.set_postfix(loss=f"{last['loss']:.4f}",
                        fid=f"{last['eval/fid']:.2f}")
        t0 = time.time()  # the next steps_per_sec excludes the evaluation
      if log:
        writer.write(step, last)
      if stop:
        print(f"preempted: checkpointed step {step} in {mngr.directory}; "
              f"the same command resumes there")
        break
  bar.close()
  writer.close()
  if search is not None:
    if step == config.total_steps:  # the decision and the pruned weights
      search.finish(state, workdir)
  elif step == config.total_steps and config.get("sample") and (
      config.sample.get("per_class", 0) > 0):
    write_sample_grid(config, model, objective, state.ema_params, mesh, workdir,
                      step)
  return last


def _bucket_models(model, spec, config) -> dict:
  """For a dataset of aspect-ratio buckets (jdit.data.buckets): the model at
  each bucket's shape, checked now (an unfit bucket would otherwise fail
  when its first batch comes, hours in); {} for other datasets."""
  if not spec.buckets:
    return {}
  if distill.enabled(config) or depth_prune.enabled(config):
    raise ValueError(f"dataset {config.data.name!r} holds aspect-ratio "
                     f"buckets; config.distill and config.depth_prune train "
                     f"at one shape only")
  if "base_grid" not in model.__dataclass_fields__:
    raise ValueError(f"{type(model).__name__} models run at one input size "
                     f"only; dataset {config.data.name!r} holds aspect-ratio "
                     f"buckets")
  models = {}
  for shape in spec.buckets:
    try:
      bucket = model.clone(input_size=tuple(shape[:2]))
      if bucket.input_shape != tuple(shape):
        raise ValueError(f"the model takes {bucket.input_shape}")
      x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
      t = jax.ShapeDtypeStruct((1,), jnp.float32)
      y = jax.ShapeDtypeStruct((1,), jnp.int32)
      jax.eval_shape(bucket.init, jax.random.key(0), x, t, y)
    except ValueError as e:
      raise ValueError(f"bucket {shape} of dataset {config.data.name!r} does "
                       f"not fit model {config.model.name!r}: {e}") from e
    models[tuple(shape)] = bucket
  return models


def _check_finite(loss: float, step: int, mngr) -> None:
  if not np.isfinite(loss):
    raise FloatingPointError(
        f"loss is {loss} at step {step}; stopping before it is checkpointed. "
        f"The last good checkpoint (step {mngr.latest_step()}) is kept; "
        f"lower config.optim.lr or check the data.")


def write_sample_grid(config, model, objective, params, mesh, workdir, step):
  """Samples `per_class` images of every class with the EMA params (a
  model without a null class, class_dropout_prob=0, unguided)."""
  s = config.sample
  scale = float(s.cfg_scale) if model.class_dropout_prob > 0 else 1.0
  guidance = diffusion.Guidance(scale=scale, null_label=model.num_classes)
  sampler = sampling.Sampler(model, objective, params, mesh=mesh,
                             sampler=s.sampler or None, steps=s.steps or None,
                             guidance=guidance)
  labels = sampling.class_labels(model.num_classes, s.per_class)
  par = sharding.batch_parallelism(mesh)
  chunk = -(-len(labels) // par) * par
  images = sampling.generate(sampler, labels, seed=config.seed, chunk=chunk)
  if jax.process_index() == 0:
    path = os.path.join(workdir, f"samples_step{step}.png")
    sampling.save_grid(images, path, ncol=s.per_class)
    np.savez(os.path.join(workdir, f"samples_step{step}.npz"), images, labels)
