"""Checkpoints: a thin wrapper around orbax's CheckpointManager.

A checkpoint step holds four items, so that sampling reads only what it needs:
  params, ema_params, opt_state   array trees (restored onto any mesh)
  meta                            JSON: step, data position, seed, config
and, in runs with post-hoc EMA, posthoc_ema (the power EMAs).
Writes are atomic (orbax renames a finished temporary directory), so a run
that fails never leaves a half-written or overwritten checkpoint behind.
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

ARRAY_ITEMS = ("params", "ema_params", "opt_state")
# The power EMAs of post-hoc EMA, only in runs that keep them.
OPTIONAL_ITEMS = ("posthoc_ema",)
ITEMS = ARRAY_ITEMS + OPTIONAL_ITEMS + ("meta",)
CHECKPOINT_SUBDIR = "checkpoints"
# The EMA params of the lowest in-training FID, kept apart from rotation.
BEST_SUBDIR = "best_fid"


def manager(directory: str, *, keep: int = 3, create: bool = True
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=ITEMS)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def save(mngr: ocp.CheckpointManager, step: int, *, params, ema_params,
         opt_state, meta: dict, posthoc_ema=()) -> None:
  items = {"params": params, "ema_params": ema_params, "opt_state": opt_state}
  if posthoc_ema:
    items["posthoc_ema"] = posthoc_ema
  args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
  args["meta"] = ocp.args.JsonSave(meta)
  mngr.save(step, args=ocp.args.Composite(**args), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, targets: dict[str, Any]
            ) -> dict[str, Any]:
  """Restores `targets` (item -> abstract tree with shardings) plus meta."""
  args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
  args["meta"] = ocp.args.JsonRestore()
  out = mngr.restore(step, args=ocp.args.Composite(**args))
  return {k: out[k] for k in list(targets) + ["meta"]}


def find_manager_dir(path: str) -> tuple[str, int | None]:
  """Resolves a workdir, a checkpoint directory or one step's directory.

  Returns (manager directory, step or None for the latest).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  sub = os.path.join(path, CHECKPOINT_SUBDIR)
  if os.path.isdir(sub):
    return sub, None
  if os.path.isdir(os.path.join(path, "meta")) and os.path.basename(
      path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  if any(d.isdigit() for d in os.listdir(path)):
    return path, None
  raise FileNotFoundError(
      f"{path} holds no jdit checkpoint: expected a workdir with "
      f"'{CHECKPOINT_SUBDIR}/', a checkpoint directory with numbered steps, "
      f"or one step's directory")


def local_target(directory: str, step: int, item: str):
  """The stored shapes and dtypes of `item`, placed on this process's first
  device: a checkpoint written on any number of devices (a pod) restores
  on a machine with another number, without its mesh."""
  metadata = ocp.StandardCheckpointHandler().metadata(
      epath.Path(directory) / str(step) / item)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      getattr(metadata, "tree", metadata))


def resolve_step(path: str) -> tuple[str, int]:
  """(manager directory, step) that `load_for_sampling(path)` reads: the
  given step's, else the latest finished one."""
  directory, step = find_manager_dir(path)
  if step is None:
    step = manager(directory, create=False).latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint step")
  return directory, step


def load_for_sampling(path: str) -> tuple[Any, ml_collections.ConfigDict]:
  """Returns (EMA params as host numpy arrays, config) from any checkpoint."""
  directory, step = resolve_step(path)
  mngr = manager(directory, create=False)

  def read(**items):
    try:
      return mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises several types for corrupt data
      raise ValueError(f"could not read checkpoint step {step} in "
                       f"{directory}: {e}") from e

  meta = read(meta=ocp.args.JsonRestore())["meta"]
  if dict(meta["config"].get("depth_prune") or {}).get("keep"):
    # Its params are the search's own (layer logits, LoRA factors).
    raise FileNotFoundError(
        f"{directory} holds a depth-pruning search (config.depth_prune), not "
        f"a model; its result is the pruned/ directory beside it")
  out = read(ema_params=ocp.args.StandardRestore(
      local_target(directory, step, "ema_params")))
  params = jax.tree.map(lambda a: jax.device_get(a), out["ema_params"])
  return params, ml_collections.ConfigDict(meta["config"])


def save_for_sampling(directory: str, params, config: ml_collections.ConfigDict,
                      step: int = 0) -> None:
  """Writes params (used as EMA params) + config where sample.py loads them.

  Used by the converters: the result has no optimizer state, so it can be
  sampled from (and fine-tuned from with `init_from`), not resumed.
  """
  mngr = manager(directory, keep=1)
  if mngr.latest_step() is not None:
    raise FileExistsError(f"{directory} already holds a checkpoint; choose "
                          f"an empty --out directory")
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      ema_params=ocp.args.StandardSave(params),
      # no opt_state item: orbax refuses empty trees, and there is none
      meta=ocp.args.JsonSave({"step": step, "data_step": step, "config":
                              config_to_dict(config)}))
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()


class BestCheckpoint:
  """Keeps the EMA params with the lowest ``eval/fid`` of a run.

  They live in ``workdir/best_fid`` (``sample.py --checkpoint
  workdir/best_fid``), one step, with the FID in its meta, apart from the
  rotated training checkpoints, so the best model survives ``keep``. A
  resumed run starts from the FID stored there.
  """

  def __init__(self, workdir: str):
    self.mngr = manager(os.path.join(workdir, BEST_SUBDIR), keep=1)
    step = self.mngr.latest_step()
    self.fid = float("inf")
    if step is not None:
      meta = self.mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
      self.fid = float(meta["eval/fid"])

  def offer(self, step: int, fid: float, ema_params, meta: dict) -> bool:
    """Saves ``ema_params`` if ``fid`` beats the best so far."""
    if not fid < self.fid:
      return False
    latest = self.mngr.latest_step()
    if latest is not None and latest >= step:
      # Left by a run that stopped after this step and was resumed from an
      # earlier checkpoint; its FID is higher, and orbax only moves forward.
      self.mngr.delete(latest)
    self.mngr.save(step, args=ocp.args.Composite(
        ema_params=ocp.args.StandardSave(ema_params),
        meta=ocp.args.JsonSave({**meta, "step": step, "eval/fid": fid})),
                   force=True)
    self.mngr.wait_until_finished()
    self.fid = fid
    return True
