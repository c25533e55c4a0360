"""CLEAR-style conversion of a pretrained DiT to local attention.

Liu, Tan & Wang, "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion
Transformers Up" (2024). A student with the teacher's architecture but the
`local` token mixer (each query sees the keys within a circle of radius r on
the token grid) starts from the teacher's weights; only its attention layers
(qkv and proj) are fine-tuned, on a modest set of images the teacher itself
generates, with

  loss = w_denoise * objective loss (on the generated samples)
       + w_out  * MSE(student output, teacher output)   at the same x_t, t, y
       + w_attn * mean over blocks of MSE(student attention output,
                                          teacher attention output)

CLEAR's defaults are w = (1, 0.5, 0.5), 10K samples and 10K iterations; its
released distill.py averages the attention term over layers, as done here.

The same machinery fine-tunes a depth-pruned student (jdit.depth_prune)
with TinyFusion's Masked KD: `num_samples = 0` trains on the configured
dataset instead of teacher samples, `trainable` covers every parameter, and

  + w_hidden * mean over student blocks i of masked MSE(student block i
               output, teacher block j(i) output)

with j(i) = floor((i + 1) T / S) - 1 for S student and T teacher blocks (the
last teacher block of the span student block i replaces; for 1:2 pruning,
j = 2i + 1). The mask drops "massive activations", the few hidden-state
entries hundreds of times larger than the rest that dominate a plain MSE:
an entry is left out when its magnitude, in the teacher's or the student's
hidden state, exceeds `massive_threshold` times that state's RMS (per
example). The threshold rule is jdit's reading of the paper.

Simplifications relative to CLEAR (FLUX, text-to-image, flow matching):
  * class labels instead of prompts; the samples are balanced over classes
    and drawn once with classifier-free guidance, then reused every epoch;
  * the objective (ddpm or flow) is whatever the teacher was trained with,
    and the output term covers all output channels (with learned sigma, the
    variance channels too); CLEAR's SD3-style loss weighting is not used;
  * the EMA of the student is kept as in ordinary training (frozen params
    stay equal up to float rounding of the EMA update).

The attention output of a block is its mixer's output (before the adaLN-Zero
gate), captured with flax's `capture_intermediates`, so DiT needs no hook and
ordinary training pays nothing. The teacher runs in every step at the
student's x_t, t and (possibly dropped) labels.

Used by jdit.train.run when `config.distill.teacher` is set; `config.init_from`
(any path checkpoint.load_for_sampling reads, default: the teacher) sets the
initial params of a fresh run.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jdit import checkpoint, distill_samples, sampling
from jdit import train_state as ts
from jdit.models import block_hooks

DATA_FILE = distill_samples.DATA_FILE
# The module name DiT gives every block's token mixer ("blocks_i/attn").
ATTN_MODULE = "attn"


def default_config() -> ml_collections.ConfigDict:
  """The `config.distill` section (teacher "" = ordinary training)."""
  c = ml_collections.ConfigDict()
  c.teacher = ""          # teacher checkpoint: workdir, checkpoints/ or step
  c.num_samples = 10_000  # teacher-generated training set (CLEAR: 10K);
  #                         0 = the configured dataset (config.data)
  c.sampler = ""          # "" = the teacher objective's default sampler
  c.steps = 0             # 0 = the objective's default number of steps
  c.cfg_scale = 1.5       # guidance used to generate the samples
  c.sample_batch = 0      # sampling chunk; 0 = config.batch_size
  c.w_denoise = 1.0       # weight of the objective's loss (CLEAR: 1)
  c.w_out = 0.5           # output distillation (CLEAR: 0.5)
  c.w_attn = 0.5          # attention-output distillation (CLEAR: 0.5)
  c.w_hidden = 0.0        # block-output (hidden state) distillation
  c.massive_threshold = 0.0  # Masked KD: entries > this x RMS are left out
  c.trainable = ATTN_MODULE  # regex searched in "/"-joined param paths
  return c


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.get("distill") and config.distill.get("teacher"))


def init_path(config: ml_collections.ConfigDict) -> str:
  """The checkpoint a fresh run starts from: init_from, else the teacher."""
  path = config.get("init_from") or ""
  return path or (config.distill.teacher if enabled(config) else "")


def flatten_params(tree) -> dict:
  """{"blocks_0/attn/qkv/kernel": leaf, ...}: leaves by "/"-joined path."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in leaves}


def check_compatible(params, target, what: str) -> None:
  """Raises ValueError naming missing, unexpected and mis-shaped params."""
  got, want = flatten_params(params), flatten_params(target)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shapes = [f"{k}: {np.shape(got[k])} vs {np.shape(want[k])}"
            for k in sorted(set(got) & set(want))
            if np.shape(got[k]) != np.shape(want[k])]
  if missing or extra or shapes:
    raise ValueError(
        f"the params of {what} do not fit the model as configured: "
        f"missing {missing[:8]}, unexpected {extra[:8]}, shape mismatches "
        f"{shapes[:8]} (params named by their path; are config.model.* "
        f"the same as when it was trained?)")


def init_from(state: ts.TrainState, path: str) -> ts.TrainState:
  """Returns `state` with params and EMA params read from checkpoint `path`.

  The optimizer state stays freshly initialised (a fine-tune, not a resume).
  """
  params, _ = checkpoint.load_for_sampling(path)
  check_compatible(params, state.params, f"init_from checkpoint {path}")
  # Two separate device copies: the train step donates both trees.
  put = lambda p, t: jax.device_put(np.asarray(p, t.dtype), t.sharding)
  return state.replace(params=jax.tree.map(put, params, state.params),
                       ema_params=jax.tree.map(put, params, state.params))


def trainable_mask(params, pattern: str):
  """Tree of bools: True where the param's path matches regex `pattern`."""
  regex = re.compile(pattern)
  flat = jax.tree_util.tree_flatten_with_path(params)
  paths = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat[0]]
  mask = [bool(regex.search(p)) for p in paths]
  if not any(mask):
    raise ValueError(f"config.distill.trainable={pattern!r} matches no "
                     f"parameter; paths look like {paths[:6]}")
  return jax.tree_util.tree_unflatten(flat[1], mask)


def partial_optimizer(tx: optax.GradientTransformation, pattern: str
                      ) -> optax.GradientTransformation:
  """`tx` for the params matching `pattern`; zero updates for the rest.

  Clipping and weight decay in `tx` then see only the trained params, and
  the optimizer holds no moments for the frozen ones.
  """

  def labels(params):
    return jax.tree.map(lambda m: "train" if m else "freeze",
                        trainable_mask(nn.meta.unbox(params), pattern))

  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               labels)


class _Weighted:
  """An objective whose loss is scaled; logs the unscaled one."""

  def __init__(self, objective, weight: float):
    self.objective, self.weight = objective, weight

  def loss(self, model_fn, x0, key, y=None):
    loss, metrics = self.objective.loss(model_fn, x0, key, y)
    return self.weight * loss, {**metrics, "denoise_loss": loss}


def _is_mixer(module, method: str) -> bool:
  return method == "__call__" and module.name == ATTN_MODULE


def _attention_outputs(state) -> dict[str, jax.Array]:
  """{block path: mixer output} from captured intermediates."""
  out = {}
  for path, leaf in flatten_params(state.get("intermediates", {})).items():
    if f"/{ATTN_MODULE}/__call__" in "/" + path:
      out[path] = leaf
  return out


def hidden_pairs(student_depth: int, teacher_depth: int):
  """[(student block i, teacher block j(i))] aligned by the hidden term."""
  return [(i, (i + 1) * teacher_depth // student_depth - 1)
          for i in range(student_depth)]


def masked_mse(student, teacher, threshold: float):
  """MSE over the entries that are not massive in either hidden state."""
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  if not threshold:
    return jnp.mean((s - t) ** 2)

  def ordinary(h):  # |h| within threshold x the example's RMS
    rms = jnp.sqrt(jnp.mean(h ** 2, axis=tuple(range(1, h.ndim)),
                            keepdims=True))
    return jnp.abs(h) <= threshold * rms

  keep = (ordinary(s) & ordinary(t)).astype(jnp.float32)
  return jnp.sum(keep * (s - t) ** 2) / jnp.maximum(jnp.sum(keep), 1.0)


def _apply_recording_blocks(model, variables, *args, **kwargs):
  """(model output, [each residual block's output])."""
  outs = []

  def record(i, call, x_in):
    del i, x_in
    outs.append(call())
    return outs[-1]

  return block_hooks.apply_with_block_hook(model, variables, record, *args,
                                           **kwargs), outs


def make_apply_fn(student, teacher, mask, w_out: float, w_attn: float,
                  w_hidden: float = 0.0, massive_threshold: float = 0.0):
  """The train step's network call with the distillation terms."""
  capture = _is_mixer if w_attn else False

  def apply_fn(params, teacher_params, x_t, t, y, drop, targets=None):
    del targets
    # Frozen params get no gradient, so XLA drops their weight-grad matmuls.
    params = jax.tree.map(
        lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
    kw = dict(train=True, force_drop_ids=drop, capture_intermediates=capture)
    (out, state), hidden = _apply_recording_blocks(
        student, {"params": params}, x_t, t, y,
        mutable=["aux_loss", "intermediates"], **kw)
    (t_out, t_state), t_hidden = _apply_recording_blocks(
        teacher, {"params": teacher_params}, x_t, t, y,
        mutable=["intermediates"], **kw)
    t_out = jax.lax.stop_gradient(t_out)
    terms = {"distill_out": w_out * jnp.mean(
        (out.astype(jnp.float32) - t_out.astype(jnp.float32)) ** 2)}
    if w_hidden:
      pairs = hidden_pairs(len(hidden), len(t_hidden))
      terms["distill_hidden"] = w_hidden * sum(
          masked_mse(hidden[i], jax.lax.stop_gradient(t_hidden[j]),
                     massive_threshold) for i, j in pairs) / len(pairs)
    if w_attn:
      s_attn = _attention_outputs(state)
      t_attn = _attention_outputs(jax.lax.stop_gradient(t_state))
      if set(s_attn) != set(t_attn) or not s_attn:
        raise ValueError(f"student and teacher attention blocks differ: "
                         f"{sorted(s_attn)} vs {sorted(t_attn)}")
      terms["distill_attn"] = w_attn * sum(
          jnp.mean((s_attn[k].astype(jnp.float32)
                    - t_attn[k].astype(jnp.float32)) ** 2)
          for k in s_attn) / len(s_attn)
    return out, {**terms, **ts.aux_loss_terms(state)}

  return apply_fn


def load_teacher(config, student):
  """(teacher model, objective, host params) from config.distill.teacher."""
  path = config.distill.teacher
  try:
    params, tconfig = checkpoint.load_for_sampling(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.distill.teacher={path!r}: {e}") from e
  teacher, objective = sampling.model_from_config(tconfig)
  if tconfig.objective != config.objective:
    raise ValueError(f"the teacher was trained with objective "
                     f"{tconfig.objective!r}, the student is configured "
                     f"with {config.objective!r}")
  fields = ("grid_shape", "patch_size", "in_channels", "num_classes",
            "out_channels")
  if config.distill.w_attn:  # attention outputs are compared block by block
    fields += ("depth",)
  for field in fields:
    if getattr(teacher, field) != getattr(student, field):
      raise ValueError(
          f"teacher {path} has {field}={getattr(teacher, field)}, the "
          f"student {getattr(student, field)}; set config.model.* like the "
          f"teacher's (its config.json)")
  return teacher, objective, params


class Distiller:
  """What jdit.train.run swaps in when config.distill.teacher is set."""

  def __init__(self, config, student, objective):
    self.config = config
    self.student = student
    self.objective = objective
    d = config.distill
    for key in ("w_denoise", "w_out", "w_attn", "w_hidden",
                "massive_threshold", "num_samples"):
      if d[key] < 0:
        raise ValueError(f"config.distill.{key} must be >= 0, got {d[key]}")
    self.teacher, self.teacher_objective, self.teacher_params = (
        load_teacher(config, student))

  def optimizer(self, tx):
    return partial_optimizer(tx, self.config.distill.trainable)

  def prepare(self, state, tx, mesh, rules, workdir, dataset):
    """Returns (input pipeline, step(state, batch) -> (state, metrics)).

    `dataset()` makes the configured dataset's pipeline (num_samples 0).
    """
    c, d = self.config, self.config.distill
    shardings = ts.state_shardings(self.teacher, optax.set_to_zero(), mesh,
                                   rules).params
    tparams = jax.tree.map(lambda p, s: jax.device_put(np.asarray(p), s),
                           self.teacher_params, shardings)
    if d.num_samples:
      pipeline = distill_samples.pipeline(
          c, self.student, self.teacher, self.teacher_objective, tparams,
          mesh, workdir)
    else:
      pipeline = dataset()
    mask = trainable_mask(state.params, d.trainable)
    step = ts.make_train_step(
        self.student, _Weighted(self.objective, float(d.w_denoise)), tx,
        ema_decay=c.ema_decay, grad_accum=c.optim.get("grad_accum", 1),
        seed=c.seed, mesh=mesh, rules=rules,
        ema_warmup=c.get("ema_warmup", False),
        apply_fn=make_apply_fn(self.student, self.teacher, mask,
                               float(d.w_out), float(d.w_attn),
                               float(d.w_hidden), float(d.massive_threshold)))
    return pipeline, lambda st, batch: step(st, batch, tparams)
