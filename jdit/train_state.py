"""Train state, optimizer, sharded initialisation and the train step."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jdit import posthoc_ema, sharding
from jdit.models.embed import label_drop_mask


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  # Power-function EMAs for post-hoc EMA (jdit.posthoc_ema), one param tree
  # per config.posthoc_ema.sigma_rels; () when off.
  posthoc_ema: Any = ()


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with warmup (+ optional cosine decay) and global-norm clipping."""
  for key in ("lr", "b1", "b2", "weight_decay", "grad_clip", "warmup_steps",
              "schedule"):
    if key not in optim:
      raise ValueError(f"config.optim.{key} is missing")
  if optim.lr <= 0:
    raise ValueError(f"config.optim.lr must be > 0, got {optim.lr}")
  warmup = max(int(optim.warmup_steps), 0)
  if optim.schedule == "constant":
    decay = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"config.optim.schedule must be 'constant' or 'cosine', "
                     f"got {optim.schedule!r}")
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup]
  ) if warmup else decay
  chain = []
  if optim.grad_clip:
    chain.append(optax.clip_by_global_norm(optim.grad_clip))
  chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay))
  return optax.chain(*chain), schedule


def model_inputs(model: nn.Module, batch_size: int = 1):
  return (jnp.zeros((batch_size,) + model.input_shape),
          jnp.zeros((batch_size,)), jnp.zeros((batch_size,), jnp.int32))


def init_state_fn(model: nn.Module, tx, num_posthoc: int = 0):
  """key -> TrainState with logically-annotated (boxed) params.

  Boxes survive tx.init, so the optimizer moments carry the same logical
  axes as their parameters and are sharded like them.
  """

  def init(key):
    params = model.init(key, *model_inputs(model))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=params, opt_state=tx.init(params),
                      posthoc_ema=(params,) * num_posthoc)

  return init


def state_shardings(model: nn.Module, tx, mesh, rules,
                    num_posthoc: int = 0) -> TrainState:
  abstract = jax.eval_shape(init_state_fn(model, tx, num_posthoc),
                            jax.random.key(0))
  return sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh,
                                      rules)


def abstract_state(model: nn.Module, tx, mesh, rules,
                   num_posthoc: int = 0) -> TrainState:
  """The state's shapes, dtypes and shardings, without computing it (the
  restore target when resuming)."""
  boxed = jax.eval_shape(init_state_fn(model, tx, num_posthoc),
                         jax.random.key(0))
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh,
                                           rules)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)


def create_state(model: nn.Module, tx, mesh, rules, seed: int,
                 num_posthoc: int = 0) -> TrainState:
  """Initialises the state directly sharded (never whole on one device)."""
  init = init_state_fn(model, tx, num_posthoc)
  out_shardings = state_shardings(model, tx, mesh, rules, num_posthoc)
  with sharding.use_mesh(mesh, rules):
    return jax.jit(lambda k: nn.meta.unbox(init(k)),
                   out_shardings=out_shardings)(jax.random.key(seed))


def ema_decay_at(step, decay: float, warmup: bool):
  """The EMA decay used at `step`.

  With warmup the decay is min(decay, (1 + step) / (10 + step)): short runs
  would otherwise keep a large share of the initial (adaLN-Zero, i.e.
  output-free) weights in the EMA; 0.999 ** 1000 is still 37%.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def aux_loss_terms(state) -> dict:
  """{"aux_loss": sum} of what a model sowed under "aux_loss" (MoE balance
  and z losses, already weighted); {} when it sowed nothing."""
  aux = jax.tree.leaves(state.get("aux_loss", {}))
  return {"aux_loss": sum(jnp.sum(a) for a in aux)} if aux else {}


def make_train_step(model: nn.Module, objective, tx, *, ema_decay: float,
                    grad_accum: int, seed: int, mesh, rules, apply_fn=None,
                    ema_warmup: bool = False, posthoc_gammas=(),
                    target_fn=None):
  """Returns a jitted (state, batch, frozen=None) -> (state, metrics).

  The state is donated. All randomness is per example: example i of global
  batch `step` uses fold_in(fold_in(key(seed), step), i), so results depend
  neither on the number of devices nor on how the batch is split for
  gradient accumulation.

  Args:
    apply_fn: how the objective's network call is made, (params, frozen,
      x_t, t, y, drop, targets) -> (output, {name: scalar loss}); the named
      losses are added to the loss and logged. Default: the model, with what
      it sows under "aux_loss" (MoE) as "aux_loss". `frozen` is the step's
      third argument (a distillation teacher's params, see jdit.distill; a
      REPA encoder's, see jdit.repa), passed per call so that it is not
      baked into the compiled step.
    target_fn: (frozen, x, images) -> per-example targets given to apply_fn
      (REPA's encoder features), computed per (micro-)batch without
      gradient; `images` is the batch's "image" entry or None. None: no
      targets.
    posthoc_gammas: exponents of the power EMAs in state.posthoc_ema
      (jdit.posthoc_ema.sigma_rel_to_gamma).
  """
  base_key = jax.random.key(seed)
  drop_prob = model.class_dropout_prob

  if apply_fn is None:
    def apply_fn(params, frozen, x_t, t, y, drop, targets):
      del frozen, targets
      out, state = model.apply({"params": params}, x_t, t, y, train=True,
                               force_drop_ids=drop, mutable=["aux_loss"])
      return out, aux_loss_terms(state)

  def loss_fn(params, frozen, x, y, keys, images):
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    drop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    drop = label_drop_mask(drop_keys, drop_prob)
    targets = (None if target_fn is None else
               jax.lax.stop_gradient(target_fn(frozen, x, images)))
    extra = {}

    def model_fn(x_t, t, y_):
      # The objective may evaluate the model on a batch built from x (same
      # order); label dropout applies to the labels it passes through.
      out, terms = apply_fn(params, frozen, x_t, t, y_, drop, targets)
      for k, v in terms.items():
        extra[k] = extra[k] + v if k in extra else v
      return out

    loss, metrics = objective.loss(model_fn, x, noise_keys, y)
    if extra:
      metrics = {**metrics, **extra}
      loss = loss + sum(extra.values())
    return loss, metrics

  def step_fn(state: TrainState, batch, frozen=None):
    x, y = batch["x"], batch["y"]
    b = x.shape[0]
    step_key = jax.random.fold_in(base_key, state.step)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(b))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    inputs = (x, y, keys, batch.get("image"))
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(state.params, frozen, *inputs)
    else:
      micro = lambda a: None if a is None else a.reshape(
          (grad_accum, b // grad_accum) + a.shape[1:])
      micro_inputs = tuple(micro(a) for a in inputs)

      def body(carry, mb):
        (l, m), g = grad_fn(state.params, frozen, *mb)
        return jax.tree.map(jnp.add, carry, (l, m, g)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, frozen, *jax.tree.map(
              lambda a: a[0], micro_inputs))))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, metrics, grads), _ = jax.lax.scan(body, zeros, micro_inputs)
      loss, metrics, grads = jax.tree.map(lambda a: a / grad_accum,
                                          (loss, metrics, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                       state.ema_params, params)
    posthoc = tuple(
        jax.tree.map(lambda e, p, b=posthoc_ema.ema_beta(state.step + 1, g):
                     b * e + (1 - b) * p, profile, params)
        for g, profile in zip(posthoc_gammas, state.posthoc_ema))
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
    return TrainState(step=state.step + 1, params=params, ema_params=ema,
                      opt_state=opt_state, posthoc_ema=posthoc), metrics

  return jax.jit(step_fn, donate_argnums=0)
