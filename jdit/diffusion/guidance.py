"""Classifier-free guidance shared by every objective and sampler.

Follows official DiT ``forward_with_cfg``: the conditional and unconditional
branches run in ONE batched network call (x concatenated with itself, labels
with the null label), ``out = uncond + w (cond - uncond)`` on the guided
channels, and every other output channel (the remaining eps channels and, with
learned sigma, the variance channels) comes from the conditional branch.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad
version of itself") is the same formula with the unconditional branch
replaced by a guide network's conditional output (``guide_fn``: a smaller or
less trained model of the same data, objective and time convention):
``out = guide + w (cond - guide)``.

Adaptive projected guidance (APG; Sadat, Hilliges and Weber 2024,
"Eliminating oversaturation and artifacts of high guidance scales") is CFG
taken in the space of the denoised estimate x0 = a(t) x + b(t) out (every
objective's output is affine in x0 at fixed x and t): the guidance update
``cond - uncond``, mapped to x0, is optionally averaged over evaluations
with momentum, clipped to a norm, and split into its part parallel to the
conditional x0 estimate (weighted by eta; it is what oversaturates) and the
orthogonal rest; then mapped back. With eta = 1, no clipping and no
momentum it is CFG.

The guidance interval is in normalised time, t = 1 the noise end for every
objective (DDPM: timestep / num_timesteps). Outside it only the conditional
branch is evaluated: a ``lax.cond`` picks a B-batch call there and the
2B-batch call inside, so an interval such as REPA's [0, 0.7] also saves
compute.
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Guidance:
  """Classifier-free guidance settings (hashable: pass as a static arg).

  Attributes:
    scale: guidance weight w; 1.0 is off (conditional only), 0.0 is the
      unconditional model.
    null_label: the null class id (the model's ``num_classes``).
    channels: guide only the first ``channels`` output channels (official DiT
      guides 3 of 4 latent channels); None guides all data channels.
    interval: guide only for normalised time t in [lo, hi] (t = 1 is noise);
      outside, the conditional branch alone is used.
    rescale: CFG-rescale weight phi in [0, 1] (Lin et al. 2024, "Common
      diffusion noise schedules and sample steps are flawed"): the guided
      output is scaled per example to the conditional output's standard
      deviation, ``phi * out * std(cond) / std(out) + (1 - phi) * out``,
      over the guided channels of the network output (as diffusers applies
      it); it counters the over-exposure of large scales. 0 = off.
    apg_eta: None for CFG, or adaptive projected guidance with this weight on
      the update's component parallel to the conditional x0 estimate (the
      paper uses 0).
    apg_norm_threshold: APG: clip the x0-space update to this L2 norm per
      example (over the guided channels); 0 = no clipping.
    apg_momentum: APG: the update is ``d + momentum * previous`` over the
      network evaluations of a run (the paper uses negative values, e.g.
      -0.5); 0 = off.
  """
  scale: float = 1.0
  null_label: int = 1000
  channels: int | None = None
  interval: tuple[float, float] = (0.0, 1.0)
  rescale: float = 0.0
  apg_eta: float | None = None
  apg_norm_threshold: float = 0.0
  apg_momentum: float = 0.0

  def __post_init__(self):
    if not self.scale >= 0.0:
      raise ValueError(f"Guidance scale must be >= 0, got {self.scale}.")
    if self.channels is not None and self.channels < 1:
      raise ValueError(
          f"Guidance channels must be None (all) or >= 1, got {self.channels}.")
    interval = tuple(float(v) for v in self.interval)
    if (len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0):
      raise ValueError(
          "Guidance interval must be (lo, hi) with 0 <= lo <= hi <= 1, got "
          f"{self.interval}.")
    if not 0.0 <= self.rescale <= 1.0:
      raise ValueError(f"Guidance rescale must be in [0, 1], got "
                       f"{self.rescale}.")
    if self.apg_eta is None and (self.apg_norm_threshold
                                 or self.apg_momentum):
      raise ValueError("Guidance apg_norm_threshold and apg_momentum apply "
                       "to adaptive projected guidance: set apg_eta too.")
    if self.apg_eta is not None and self.scale == 1.0:
      raise ValueError("Guidance apg_eta applies to a guidance scale other "
                       "than 1 (at 1 nothing is guided).")
    if not self.apg_norm_threshold >= 0.0:
      raise ValueError(f"Guidance apg_norm_threshold must be >= 0, got "
                       f"{self.apg_norm_threshold}.")
    if not -1.0 < self.apg_momentum < 1.0:
      raise ValueError(f"Guidance apg_momentum must be in (-1, 1), got "
                       f"{self.apg_momentum}.")
    object.__setattr__(self, "interval", interval)
    object.__setattr__(self, "rescale", float(self.rescale))
    object.__setattr__(self, "scale", float(self.scale))

  @property
  def active(self) -> bool:
    """Whether guidance changes anything (scale != 1 on a non-empty span)."""
    return self.scale != 1.0


def check_guidance(guidance):
  """Accepts None, a float scale or a Guidance; returns Guidance or None."""
  if guidance is None:
    return None
  if isinstance(guidance, (int, float)):
    guidance = Guidance(scale=float(guidance))
  if not isinstance(guidance, Guidance):
    raise ValueError("guidance must be None, a float scale or a Guidance, "
                     f"got {guidance!r}.")
  return guidance if guidance.active else None


def stateless(model_fn):
  """Adapts a plain network ``(x, t, y) -> out`` to the stateful form
  ``(x, t, y, state) -> (out, state)`` that samplers call; its state is
  ``((), ())``."""
  return lambda x, t, y, state: (model_fn(x, t, y), state)


def _join(a, b):
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v]), a, b)


def _apg_update(guidance, x0_affine, x, t_norm, cond, uncond, average):
  """APG's replacement for ``cond - uncond`` (guided channels only), in
  output units, and the momentum state: ``average`` is [] without momentum,
  else [the previous x0-space update], and comes back updated."""
  axes = tuple(range(1, x.ndim))
  a, b = (jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
          for v in x0_affine(t_norm))
  # Where out barely moves x0 (b ~ 0: a flow's velocity at t = 0) there is
  # no x0-space update to take: plain CFG there.
  usable = jnp.abs(b) > 1e-6
  b = jnp.where(usable, b, 1.0)
  d = b * (cond - uncond)
  if guidance.apg_momentum:
    d = d + guidance.apg_momentum * average[0]
    average = [jnp.where(usable, d, average[0])]
  norm = lambda v: jnp.sqrt(jnp.sum(v * v, axes, keepdims=True))
  if guidance.apg_norm_threshold:
    d = d * jnp.minimum(1.0, guidance.apg_norm_threshold
                        / jnp.maximum(norm(d), 1e-12))
  x0 = a * x + b * cond
  unit = x0 / jnp.maximum(norm(x0), 1e-12)
  parallel = jnp.sum(d * unit, axes, keepdims=True) * unit
  d = d - parallel + guidance.apg_eta * parallel
  return jnp.where(usable, d / b, cond - uncond), average


def guided_model(model_fn, guidance, y, data_channels, state=((), ()),
                 guide_fn=None, x0_affine=None, x_shape=None):
  """Wraps a stateful network into ``fn(x, t_model, t_norm, state)``.

  Args:
    model_fn: ``(x, t_model, y, state) -> ((B, H, W, C_out), state)``, where
      ``state = (shared, rows)`` and every leaf of ``rows`` leads with the
      batch (``stateless`` adapts a plain network; ``jdit.feature_cache``
      carries cached block updates this way).
    guidance: a Guidance or None (no guidance: one plain call per step).
    y: labels ``(B,)`` or None.
    data_channels: C, the number of data channels; with learned sigma the
      output has 2C channels and only the first C can be guided.
    state: the network's initial state for the B conditional rows.
    guide_fn: None (classifier-free guidance), or a plain network ``(x,
      t_model, y) -> out`` whose conditional output takes the unconditional
      branch's place (autoguidance); it is called on the B rows alone.
    x0_affine: APG only: ``t_norm (B,) -> (a, b)``, each (B,), with the
      objective's denoised estimate ``x0 = a x + b out`` on the guided
      channels.
    x_shape: APG with momentum only: the shape of x, for the running
      average's initial zeros.

  Returns:
    ``(fn, state)``: ``fn(x (B,H,W,C), t_model (B,), t_norm (B,), state)``
    returns the (possibly guided) network output as float32 and the next
    state; ``state`` is its initial value (with guidance,
    ``(shared, rows, unconditional rows)``, and with APG momentum the
    x0-space running average after those).
  """
  guidance = check_guidance(guidance)
  if guidance is None:
    def plain(x, t_model, t_norm, state):
      del t_norm
      out, state = model_fn(x, t_model, y, state)
      return out.astype(jnp.float32), state
    return plain, state
  if y is None and guide_fn is None:
    raise ValueError("Classifier-free guidance needs labels y; got y=None.")
  k = data_channels if guidance.channels is None else guidance.channels
  if k > data_channels:
    raise ValueError(
        f"Guidance channels={guidance.channels} exceeds the {data_channels} "
        "data channels.")
  lo, hi = guidance.interval
  w = guidance.scale
  apg = guidance.apg_eta is not None
  if apg and x0_affine is None:
    raise ValueError("Adaptive projected guidance needs the objective's "
                     "x0_affine.")
  if guidance.apg_momentum and x_shape is None:
    raise ValueError("APG momentum needs x_shape.")

  def both(x, t_model, t_norm, state):
    shared, rows, uncond_rows, *average = state
    b = x.shape[0]
    if guide_fn is not None:
      cond, (shared, rows) = model_fn(x, t_model, y, (shared, rows))
      cond = cond.astype(jnp.float32)
      uncond = guide_fn(x, t_model, y).astype(jnp.float32)
    else:
      y_null = jnp.full_like(y, guidance.null_label)
      out, (shared, both_rows) = model_fn(
          jnp.concatenate([x, x]), jnp.concatenate([t_model, t_model]),
          jnp.concatenate([y, y_null]), (shared, _join(rows, uncond_rows)))
      out = out.astype(jnp.float32)
      cond, uncond = out[:b], out[b:]
      rows = jax.tree.map(lambda r: r[:b], both_rows)
      uncond_rows = jax.tree.map(lambda r: r[b:], both_rows)
    if apg:
      update, average = _apg_update(guidance, x0_affine, x[..., :k], t_norm,
                                    cond[..., :k], uncond[..., :k], average)
      mixed = cond[..., :k] + (w - 1) * update
    else:
      mixed = uncond[..., :k] + w * (cond[..., :k] - uncond[..., :k])
    if guidance.rescale:
      axes = tuple(range(1, x.ndim))
      ratio = cond[..., :k].std(axes, keepdims=True) / jnp.maximum(
          mixed.std(axes, keepdims=True), 1e-12)
      mixed = guidance.rescale * ratio * mixed + (1 - guidance.rescale) * mixed
    inside = (t_norm >= lo) & (t_norm <= hi)
    inside = inside.reshape((b,) + (1,) * (x.ndim - 1))
    mixed = jnp.where(inside, mixed, cond[..., :k])
    return (jnp.concatenate([mixed, cond[..., k:]], axis=-1),
            (shared, rows, uncond_rows, *average))

  initial = (state[0], state[1], state[1])
  if guidance.apg_momentum:
    initial += (jnp.zeros(tuple(x_shape[:-1]) + (k,), jnp.float32),)
  if (lo, hi) == (0.0, 1.0):
    return both, initial

  def cond_only(x, t_model, t_norm, state):
    del t_norm
    shared, rows, uncond_rows, *average = state
    out, (shared, rows) = model_fn(x, t_model, y, (shared, rows))
    return out.astype(jnp.float32), (shared, rows, uncond_rows, *average)

  def fn(x, t_model, t_norm, state):
    inside = jnp.any((t_norm >= lo) & (t_norm <= hi))
    return jax.lax.cond(inside, both, cond_only, x, t_model, t_norm, state)

  return fn, initial
