"""Learnable depth pruning of a pretrained DiT (TinyFusion).

Fang, Li, Ma & Wang, "TinyFusion: Diffusion Transformers Learned Shallow"
(CVPR 2025). The blocks of a pretrained model are split into consecutive
groups of `group`; from each group `keep` blocks survive ("1:2" turns
DiT-XL/2's 28 blocks into TinyDiT-D14). Which ones is learned: every group
holds logits over its C(group, keep) masks, each training step draws one
mask per group with a hard, straight-through Gumbel-softmax, and the masked
model is trained with the ordinary diffusion loss while its weights
co-adapt (a LoRA update by default), so that the choice favours the blocks
whose removal the remaining ones recover from best ("recoverability"), not
the ones that matter least before any fine-tuning.

A dropped block is skipped through its residual connection: block i maps x
to x + m_i (block(x) - x), with m_i in {0, 1} from the sampled mask.

After the search the decision is read from the EMA logits (argmax per
group), and the kept blocks are cut out of the *original* weights (the LoRA
update only served the search, as in TinyFusion) into `workdir/pruned`, a
checkpoint of the shallow model that sample.py reads and that a fine-tune
starts from (`config.init_from`; with Masked KD from the full model, see
jdit.distill and configs/tinyfusion.py).

Defaults follow TinyFusion's released search script: LoRA rank 8 with
alpha = 2 rank, Gumbel temperature from 4 to 0.1 linearly over the run, a
logit scale of 100, a 10x learning rate on the logits, AdamW at 1e-4
without weight decay. Differences: the logits' learning rate multiplies an
AdamW update clipped separately from the weights'; one mask is drawn per
step (shared by gradient-accumulation micro-batches, as in one big batch).

`python -m jdit.depth_prune --checkpoint DIR --keep 0,2,4 --out OUT` cuts
given blocks out of any checkpoint (pruning by hand-picked indices, e.g.
TinyFusion's BK-SDM-style baseline).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jdit import checkpoint, distill, sampling, sharding
from jdit import train_state as ts
from jdit.models import block_hooks

WEIGHT_MODES = ("lora", "full", "frozen")
PRUNED_SUBDIR = "pruned"
DECISION_FILE = "depth_prune.json"


def default_config() -> ml_collections.ConfigDict:
  """The `config.depth_prune` section (keep 0 = ordinary training)."""
  c = ml_collections.ConfigDict()
  c.keep = 0              # blocks kept per group; 0 = off
  c.group = 2             # consecutive blocks per group (1:2 halves depth)
  c.weights = "lora"      # how weights co-adapt: lora | full | frozen
  c.lora_rank = 8
  c.lora_scale = 2.0      # alpha / rank (TinyFusion: alpha = 2 rank)
  c.tau = (4.0, 0.1)      # Gumbel temperature, first -> last step
  c.scaling = (100.0, 100.0)  # logit scale (one-hotness), first -> last
  c.gate_lr_mult = 10.0   # learning rate of the logits / config.optim.lr
  return c


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("depth_prune") and config.depth_prune.get("keep"))


def mask_options(keep: int, group: int) -> np.ndarray:
  """(C(group, keep), group) float32: every way to keep `keep` of `group`."""
  rows = []
  for kept in itertools.combinations(range(group), keep):
    row = np.zeros(group, np.float32)
    row[list(kept)] = 1
    rows.append(row)
  return np.stack(rows)


def layer_mask(gates, options, key, tau, scaling):
  """Samples a (groups * group,) 0/1 block mask; gradients reach `gates`.

  Hard Gumbel-softmax per group over the options, straight through: the
  forward pass uses the one-hot choice, the backward pass the softmax.
  """
  logits = gates.astype(jnp.float32) * scaling
  noise = jax.random.gumbel(key, logits.shape, jnp.float32)
  soft = jax.nn.softmax((logits + noise) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1])
  choice = hard + soft - jax.lax.stop_gradient(soft)
  return (choice @ jnp.asarray(options)).reshape(-1)


def decision(gates, options, scaling: float) -> tuple[list[int], list[float]]:
  """(kept block indices, per-group probability of the chosen option)."""
  gates = np.asarray(gates, np.float32)
  options = np.asarray(options)
  group = options.shape[1]
  choice = np.argmax(gates, axis=-1)
  kept = [g * group + int(j) for g, c in enumerate(choice)
          for j in np.flatnonzero(options[c])]
  logits = gates * scaling
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return kept, [float(p[c]) for p, c in zip(probs, choice)]


def prune_blocks(params, kept, depth: int):
  """`params` of a `depth`-block model reduced to blocks `kept`, renumbered.

  Blocks are the top-level "blocks_<i>" entries; everything else is kept.
  """
  kept = [int(i) for i in kept]
  if (not kept or sorted(set(kept)) != kept
      or not all(0 <= i < depth for i in kept)):
    raise ValueError(f"kept blocks must be increasing distinct indices in "
                     f"[0, {depth}), got {kept}")
  names = {f"blocks_{i}" for i in range(depth)}
  missing = sorted(names - set(params))
  if missing:
    raise ValueError(f"params have no {missing[:4]}: not a {depth}-block "
                     f"DiT-family model")
  out = {k: v for k, v in params.items() if k not in names}
  for j, i in enumerate(kept):
    out[f"blocks_{j}"] = params[f"blocks_{i}"]
  return out


def pruned_config(config: ml_collections.ConfigDict, kept
                  ) -> ml_collections.ConfigDict:
  """The model config of the shallow model (per-block fields remapped)."""
  c = ml_collections.ConfigDict(config.to_dict())
  layers = c.model.get("mixer_layers")
  with c.unlocked():
    c.model.depth = len(kept)
    if layers is not None:
      c.model.mixer_layers = tuple(j for j, i in enumerate(kept)
                                   if i in set(layers))
    c.init_from = ""
    if "depth_prune" in c:
      c.depth_prune.keep = 0
  return c


def check_prunable(model) -> None:
  """Depth pruning needs an isotropic stack of `depth` residual blocks."""
  depth = getattr(model, "depth", None)
  if not isinstance(depth, int):
    raise ValueError(f"depth pruning needs an isotropic DiT-family model "
                     f"with a `depth` field; {type(model).__name__} has none")
  if getattr(model, "repa", None):
    raise ValueError("depth pruning of a model with a REPA projector is not "
                     "supported: its depth refers to the unpruned blocks")


def lora_init(params, rank: int, key):
  """Low-rank factors for every kernel: {path: {"a": (fan_in, r), "b":
  (r, fan_out)}}, nested like `params`. A kernel's last axis is its output,
  the others its input; b starts at zero, so the update starts at zero."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for n, (path, w) in enumerate(sorted(flat.items())):
    if path[-1] != "kernel" or np.ndim(w) < 2:
      continue
    fan_in = int(np.prod(w.shape[:-1]))
    bound = fan_in ** -0.5
    out[path] = {"a": jax.random.uniform(
        jax.random.fold_in(key, n), (fan_in, rank), jnp.float32, -bound,
        bound), "b": jnp.zeros((rank, w.shape[-1]), jnp.float32)}
  return flax.traverse_util.unflatten_dict(
      {p + (k,): v for p, f in out.items() for k, v in f.items()})


def with_lora(params, lora, scale: float):
  """params with every kernel W replaced by W + scale * a @ b."""
  flat = flax.traverse_util.flatten_dict(params)
  factors = flax.traverse_util.flatten_dict(lora)
  for path in {p[:-1] for p in factors}:
    w = flat[path]
    delta = factors[path + ("a",)] @ factors[path + ("b",)]
    flat[path] = w + (scale * delta).reshape(w.shape).astype(w.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def _ramp(values, progress):
  first, last = (float(v) for v in values)
  return first + (last - first) * progress


class _SearchModel:
  """The parameter layout of the search, {"base", "gates"[, "lora"]}, in
  the shape jdit.train_state builds sharded states from."""

  def __init__(self, base, num_groups: int, num_options: int, lora_rank: int):
    self.base, self.lora_rank = base, lora_rank
    self.gates_shape = (num_groups, num_options)
    self.input_shape = base.input_shape

  def init(self, key, x, t, y):
    base = self.base.init(key, x, t, y)["params"]
    params = {"base": base, "gates": jnp.zeros(self.gates_shape, jnp.float32)}
    if self.lora_rank:
      params["lora"] = lora_init(nn.meta.unbox(base), self.lora_rank,
                                 jax.random.fold_in(key, 1))
    return {"params": params}


class LayerSearch:
  """What jdit.train.run swaps in when config.depth_prune.keep is set."""

  def __init__(self, config, model, objective):
    d = config.depth_prune
    check_prunable(model)
    if d.weights not in WEIGHT_MODES:
      raise ValueError(f"config.depth_prune.weights must be one of "
                       f"{WEIGHT_MODES}, got {d.weights!r}")
    if not 1 <= d.keep < d.group:
      raise ValueError(f"config.depth_prune.keep must be in [1, group="
                       f"{d.group}), got {d.keep}")
    if model.depth % d.group:
      raise ValueError(f"config.depth_prune.group={d.group} must divide the "
                       f"model's depth {model.depth}")
    if d.weights == "lora" and d.lora_rank < 1:
      raise ValueError(f"config.depth_prune.lora_rank must be >= 1 with "
                       f"weights 'lora', got {d.lora_rank}")
    for key in ("tau", "scaling"):
      if len(d[key]) != 2 or min(d[key]) <= 0:
        raise ValueError(f"config.depth_prune.{key} must be (first, last) "
                         f"> 0, got {d[key]}")
    if not config.get("init_from"):
      raise ValueError("depth pruning needs config.init_from: the "
                       "pretrained checkpoint to prune")
    self.config, self.model, self.objective = config, model, objective
    self.options = mask_options(d.keep, d.group)
    self.state_model = _SearchModel(
        model, model.depth // d.group, len(self.options),
        d.lora_rank if d.weights == "lora" else 0)

  def labels(self, params):
    weights = "train" if self.config.depth_prune.weights == "full" else "freeze"
    return {k: {"base": weights, "gates": "gates"}.get(k, "train")
            for k in params}

  def optimizer(self, tx):
    mult = float(self.config.depth_prune.gate_lr_mult)
    return optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero(),
         "gates": optax.chain(tx, optax.scale(mult))}, self.labels)

  def init(self, state: ts.TrainState) -> ts.TrainState:
    """The base weights of a fresh search: config.init_from."""
    only_base = state.replace(params=state.params["base"],
                              ema_params=state.ema_params["base"])
    base = distill.init_from(only_base, self.config.init_from)
    return state.replace(
        params={**state.params, "base": base.params},
        ema_params={**state.ema_params, "base": base.ema_params})

  def apply_fn(self):
    """The train step's network call: the base model under a sampled mask."""
    d, model = self.config.depth_prune, self.model
    total = max(self.config.total_steps - 1, 1)
    key = jax.random.fold_in(jax.random.key(self.config.seed), 0xD3E7)
    frozen = d.weights != "full"

    def apply_fn(params, step, x_t, t, y, drop, targets=None):
      del targets
      progress = jnp.minimum(step.astype(jnp.float32) / total, 1.0)
      mask = layer_mask(params["gates"], self.options,
                        jax.random.fold_in(key, step), _ramp(d.tau, progress),
                        _ramp(d.scaling, progress))
      weights = params["base"]
      if frozen:  # no weight-gradient matmuls for the frozen base
        weights = jax.lax.stop_gradient(weights)
      if "lora" in params:
        weights = with_lora(weights, params["lora"], float(d.lora_scale))

      def block_fn(i, call, x_in):
        out = call()
        return x_in + mask[i].astype(out.dtype) * (out - x_in)

      out, state = block_hooks.apply_with_block_hook(
          model, {"params": weights}, block_fn, x_t, t, y, train=True,
          force_drop_ids=drop, mutable=["aux_loss"])
      return out, ts.aux_loss_terms(state)

    return apply_fn

  def prepare(self, state, tx, mesh, rules, workdir, dataset):
    """Returns (input pipeline, step(state, batch) -> (state, metrics))."""
    del state, workdir
    c = self.config
    step = ts.make_train_step(
        self.model, self.objective, tx, ema_decay=c.ema_decay,
        grad_accum=c.optim.get("grad_accum", 1), seed=c.seed, mesh=mesh,
        rules=rules, ema_warmup=c.get("ema_warmup", False),
        apply_fn=self.apply_fn())
    # The step number travels as the "frozen" argument (the temperature
    # and the mask's key depend on it): a fresh buffer, since the state
    # itself is donated, with one sharding, so the step compiles once.
    replicated = sharding.NamedSharding(mesh, sharding.P())
    return dataset(), lambda st, batch: step(
        st, batch, jax.device_put(st.step + 0, replicated))

  def current(self, state) -> tuple[list[int], list[float]]:
    gates = jax.device_get(state.ema_params["gates"])
    return decision(gates, self.options, self.config.depth_prune.scaling[1])

  def metrics(self, state) -> dict:
    _, confidence = self.current(state)
    return {"prune/confidence": float(np.mean(confidence)),
            "prune/min_confidence": float(np.min(confidence))}

  def finish(self, state, workdir: str) -> None:
    """Writes the decision and the pruned original weights."""
    kept, confidence = self.current(state)
    out = os.path.join(workdir, PRUNED_SUBDIR)
    if jax.process_index() == 0:
      d = self.config.depth_prune
      tmp = os.path.join(workdir, DECISION_FILE + ".tmp")
      with open(tmp, "w") as f:
        json.dump({"kept": kept, "confidence": confidence,
                   "keep": int(d.keep), "group": int(d.group),
                   "init_from": self.config.init_from}, f, indent=2)
      os.replace(tmp, os.path.join(workdir, DECISION_FILE))
    if os.path.isdir(out) and os.listdir(out):
      return  # written by the run that reached the last step
    params, _ = checkpoint.load_for_sampling(self.config.init_from)
    checkpoint.save_for_sampling(
        out, prune_blocks(params, kept, self.model.depth),
        pruned_config(self.config, kept))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
      prog="python -m jdit.depth_prune",
      description="Cut the given blocks out of a DiT-family checkpoint.")
  p.add_argument("--checkpoint", required=True,
                 help="any checkpoint sample.py reads")
  p.add_argument("--keep", required=True,
                 help="comma-separated 0-based indices of the blocks to keep")
  p.add_argument("--out", required=True, help="new, empty directory")
  args = p.parse_args(argv)
  try:
    kept = [int(i) for i in args.keep.split(",")]
  except ValueError:
    p.error(f"--keep must be comma-separated integers, got {args.keep!r}")
  params, config = checkpoint.load_for_sampling(args.checkpoint)
  model, _ = sampling.model_from_config(config)
  check_prunable(model)
  write_pruned(params, config, kept, model.depth, args.out)
  print(json.dumps({"out": args.out, "depth": len(kept), "kept": kept}))


def write_pruned(params, config, kept, depth: int, out: str) -> None:
  """Writes the checkpoint of blocks `kept` of (params, config) of a
  `depth`-block model to `out`, where sample.py and
  config.distill.init_from read it."""
  pruned = prune_blocks(params, kept, depth)  # fails before writing
  checkpoint.save_for_sampling(os.path.abspath(out), pruned,
                               pruned_config(config, kept))


if __name__ == "__main__":
  main()
