"""The Objective base class: what the trainer and sample.py call."""
import jax
import jax.numpy as jnp

from jdit.diffusion import guidance as guidance_lib


class Objective:
  """A training objective with its samplers (one subclass per objective).

  Subclasses set ``name``, ``samplers``, ``default_sampler``,
  ``default_steps`` and ``sampler_options`` (per sampler, the allowed keyword
  options and their defaults), and implement ``model_time``, ``loss`` and
  ``_sample``.
  """
  name: str = ""
  samplers: tuple[str, ...] = ()
  default_sampler: str = ""
  default_steps: int = 1
  sampler_options: dict[str, dict] = {}

  def model_time(self, t) -> jnp.ndarray:
    """Maps the objective's time to the network's ``t`` input."""
    raise NotImplementedError

  def loss(self, model_fn, x0, key, y=None):
    """Returns ``(scalar mean loss, dict of scalar metrics)``."""
    raise NotImplementedError

  def x0_affine(self, t_norm):
    """``(a, b)``, each (B,), with the denoised estimate ``x0 = a x + b
    out`` of a network output `out` at normalised time `t_norm` (what
    adaptive projected guidance works in)."""
    raise NotImplementedError

  def _sample(self, fn, state, noise, key, sampler, steps, options):
    """Integrates with ``fn(x, t_model, t_norm, state) -> (out, state)``
    (the guided network, guidance.guided_model); returns the samples and
    the network's final state."""
    raise NotImplementedError

  def evaluations(self, sampler, steps) -> int:
    """Network calls of one sampling run (one per step unless overridden)."""
    del sampler
    return int(steps)

  def is_stochastic(self, sampler, options) -> bool:
    """Whether ``sampler`` with ``options`` draws noise (needs a key)."""
    raise NotImplementedError

  def check_sampler(self, sampler=None, steps=None, options=None):
    """Validates sampler arguments; returns ``(sampler, steps, options)``.

    ``options`` come back merged over this sampler's defaults.
    """
    sampler = self.default_sampler if sampler is None else sampler
    if sampler not in self.samplers:
      raise ValueError(
          f"Unknown sampler {sampler!r} for objective {self.name!r}; "
          f"allowed: {self.samplers}.")
    steps = self.default_steps if steps is None else steps
    if int(steps) != steps or steps < 1:
      raise ValueError(f"steps must be an integer >= 1, got {steps}.")
    allowed = self.sampler_options[sampler]
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
      raise ValueError(
          f"Unknown options {unknown} for sampler {sampler!r}; allowed: "
          f"{tuple(allowed)}.")
    return sampler, int(steps), {**allowed, **options}

  def sample(self, model_fn, noise, key, *, y=None, sampler=None, steps=None,
             guidance=None, guide_fn=None, return_state=False,
             **sampler_options):
    """Draws samples by integrating from ``noise`` to data.

    Jittable with ``model_fn``, ``sampler``, ``steps``, ``guidance`` and the
    options static; the loop is a ``lax.scan`` (compiled once, not per step).

    Args:
      model_fn: ``(x, t_model, y) -> (B, H, W, C_out)``, or a stateful
        network with ``init_state(x, t_model, y)`` and ``__call__(x, t_model,
        y, state) -> (out, state)`` (``jdit.feature_cache.CachedNetwork``).
      noise: ``(B, H, W, C)`` standard normal, the t = 1 state.
      key: PRNG key; may be None for deterministic samplers.
      y: ``(B,)`` int labels or None.
      sampler: one of ``self.samplers`` (default ``self.default_sampler``).
      steps: number of steps (default ``self.default_steps``), >= 1.
      guidance: None, a float CFG scale, or a ``Guidance``.
      guide_fn: with guidance, a plain network ``(x, t_model, y) -> out``
        that replaces the unconditional branch (autoguidance).
      return_state: also return the stateful network's final state:
        ``(shared, rows)``, and with guidance ``(shared, rows, uncond_rows)``
        (the unconditional rows' own part).
      **sampler_options: per-sampler options, see ``self.sampler_options``.

    Returns:
      Samples with the shape of ``noise``, float32 (and the state).
    """
    sampler, steps, options = self.check_sampler(sampler, steps,
                                                 sampler_options)
    guidance = guidance_lib.check_guidance(guidance)
    if key is None:
      if self.is_stochastic(sampler, options):
        raise ValueError(f"Sampler {sampler!r} is stochastic: pass a key.")
      key = jax.random.PRNGKey(0)  # Unused by deterministic samplers.
    noise = jnp.asarray(noise, jnp.float32)
    if hasattr(model_fn, "init_state"):
      state = model_fn.init_state(noise, jnp.zeros(noise.shape[:1]), y)
    else:
      model_fn, state = guidance_lib.stateless(model_fn), ((), ())
    fn, state = guidance_lib.guided_model(
        model_fn, guidance, y, noise.shape[-1], state, guide_fn,
        x0_affine=self.x0_affine, x_shape=noise.shape)
    x, state = self._sample(fn, state, noise, key, sampler, steps, options)
    return (x, state) if return_state else x


def draw_time_and_noise(key, draw_time, shape):
  """Draws training times and noise for a batch of shape `shape`.

  Args:
    key: one PRNG key (the whole batch drawn at once) or a (B,) array of
      keys, one per example: then example i's draws depend only on key i, so
      a trainer can split a batch into micro-batches (gradient accumulation)
      or over devices without changing any random number.
    draw_time: (key, n) -> (n,) times.
    shape: the batch shape (B, ...).

  Returns:
    (t of shape (B,), noise of shape `shape`, float32).
  """
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 0:
    key_t, key_n = jax.random.split(key)
    return (draw_time(key_t, shape[0]),
            jax.random.normal(key_n, shape, jnp.float32))
  if key.shape != shape[:1]:
    raise ValueError(f"per-example keys must have shape {shape[:1]}, got "
                     f"{key.shape}")
  pairs = jax.vmap(jax.random.split)(key)
  t = jax.vmap(lambda k: draw_time(k, 1)[0])(pairs[:, 0])
  noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(
      pairs[:, 1])
  return t, noise
