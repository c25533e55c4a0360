"""Feature caching for sampling: reuse residual blocks' outputs across steps.

Adjacent sampling steps see nearly the same input, so a transformer block's
residual update ``block(x) - x`` changes slowly from one network evaluation
to the next. FORA (Selvaraju et al. 2024) recomputes every block only every
``interval``-th evaluation and reuses the cached updates in between; the
evaluations in between cost the patch embedding, the conditioning and the
final layer only. Delta-DiT-style schedules cache only a range of blocks.

``CachedNetwork`` wraps any jdit backbone whose blocks set
``residual_block = True`` (DiT and every family built on its blocks,
LaMamba-Diff): the blocks are found by intercepting their calls
(jdit.models.block_hooks), so no model code knows about caching. Each
reused block costs one add; the cache holds one ``(B, tokens, width)``
update per block and per row (twice the rows under classifier-free
guidance).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdit.models import block_hooks


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """Which blocks a network evaluation recomputes.

  Attributes:
    interval: evaluations per refresh; evaluation ``n`` recomputes every
      block iff ``n < warmup`` or ``(n - warmup) % interval == 0``. 1 = no
      reuse (every block computed at every evaluation).
    warmup: the first ``warmup`` evaluations compute every block (the noisy
      start, where features move fastest).
    blocks: ``(first, stop)``: only blocks ``first <= i < stop`` reuse their
      cached update, the others are always computed; None = all blocks.
    schedule: instead of the three above, a table of bools, one row per
      evaluation and one column per block: True computes the block, False
      reuses its update (a learned schedule, jdit.learn_cache); evaluations
      past the table compute every block.

  Evaluation 0 always computes every block. Evaluations are counted per
  network call: one per step for euler/ddpm/ddim/dpm++/sde, two for heun;
  with classifier-free guidance the conditional and unconditional rows are
  one call.
  """
  interval: int = 1
  warmup: int = 0
  blocks: tuple[int, int] | None = None
  schedule: tuple[tuple[bool, ...], ...] | None = None

  def __post_init__(self):
    if isinstance(self.interval, bool) or not isinstance(
        self.interval, int) or self.interval < 1:
      raise ValueError(f"feature cache interval must be an integer >= 1, "
                       f"got {self.interval!r}")
    if isinstance(self.warmup, bool) or not isinstance(
        self.warmup, int) or self.warmup < 0:
      raise ValueError(f"feature cache warmup must be an integer >= 0, got "
                       f"{self.warmup!r}")
    if self.blocks is not None:
      ok = (len(tuple(self.blocks)) == 2 and all(
          isinstance(b, int) and not isinstance(b, bool)
          for b in self.blocks) and 0 <= self.blocks[0] < self.blocks[1])
      if not ok:
        raise ValueError(f"feature cache blocks must be (first, stop) with "
                         f"0 <= first < stop, got {self.blocks!r}")
      object.__setattr__(self, "blocks", tuple(self.blocks))
    if self.schedule is not None:
      if (self.interval, self.warmup, self.blocks) != (1, 0, None):
        raise ValueError("a feature cache schedule replaces interval, warmup "
                         "and blocks; leave those at their defaults")
      table = tuple(tuple(bool(v) for v in row) for row in self.schedule)
      if not table or len({len(row) for row in table}) != 1 or not table[0]:
        raise ValueError("a feature cache schedule must be a non-empty table "
                         "(evaluations x blocks) of equal rows")
      object.__setattr__(self, "schedule", table)

  @property
  def active(self) -> bool:
    if self.schedule is not None:
      return not all(all(row) for row in self.schedule)
    return self.interval > 1

  def check_depth(self, num_blocks: int) -> None:
    if self.blocks is not None and self.blocks[1] > num_blocks:
      raise ValueError(f"feature cache blocks {self.blocks} exceed the "
                       f"model's {num_blocks} cacheable blocks")
    if self.schedule is not None and len(self.schedule[0]) != num_blocks:
      raise ValueError(f"the feature cache schedule has "
                       f"{len(self.schedule[0])} blocks a row, but the model "
                       f"has {num_blocks} cacheable blocks")

  def check_evaluations(self, evaluations: int) -> None:
    """A schedule is learned for one sampler and step count: its rows must
    be the run's network evaluations."""
    if self.schedule is not None and len(self.schedule) != evaluations:
      raise ValueError(f"the feature cache schedule has {len(self.schedule)} "
                       f"rows (network evaluations), but this sampler and "
                       f"step count make {evaluations}; learn one for them "
                       f"(python -m jdit.learn_cache)")

  def refresh(self, count, num_blocks: int):
    """Bool ``(num_blocks,)``: which blocks evaluation ``count`` computes."""
    count = jnp.asarray(count)
    if self.schedule is not None:
      table = jnp.asarray(self.schedule, bool)
      row = table[jnp.clip(count, 0, len(self.schedule) - 1)]
      return row | (count >= len(self.schedule))
    everything = (count < self.warmup) | (
        (count - self.warmup) % self.interval == 0)
    i = jnp.arange(num_blocks)
    lo, hi = self.blocks if self.blocks is not None else (0, num_blocks)
    return everything | (i < lo) | (i >= hi)

  def computed_fraction(self, evaluations: int, num_blocks: int) -> float:
    """Fraction of block evaluations computed over ``evaluations`` calls."""
    n = jnp.arange(evaluations)
    table = jax.vmap(lambda c: self.refresh(c, num_blocks))(n)
    return float(jnp.mean(table))


class CachedNetwork:
  """A stateful network ``(x, t, y, state) -> (out, state)`` for samplers.

  ``state = (count, rows)``: ``count`` is the number of evaluations so far,
  ``rows = (valid, updates)`` holds per row whether its cached updates were
  computed (rows start invalid; a call with any invalid row computes every
  block) and one residual update per block. Rows lead every leaf of
  ``rows``, so guidance can split and join the conditional and
  unconditional halves.
  """

  def __init__(self, model, params, cache: FeatureCache):
    if "remat" in getattr(model, "__dataclass_fields__", {}):
      model = model.clone(remat="none")  # sampling keeps no activations
    self.model, self.params, self.cache = model, params, cache

  def _apply(self, x, t, y, block_fn):
    return block_hooks.apply_with_block_hook(
        self.model, {"params": self.params}, block_fn, x, t, y)

  def init_state(self, x, t, y):
    """Zero state for a batch like ``x`` (every row invalid)."""
    shapes = []

    def record(i, call, x_in):
      del i, x_in
      out = call()
      shapes.append(jax.ShapeDtypeStruct(out.shape, out.dtype))
      return out

    jax.eval_shape(lambda x, t, y: self._apply(x, t, y, record), x, t, y)
    if not shapes:
      raise ValueError(f"{type(self.model).__name__} has no blocks marked "
                       "residual_block = True; it cannot cache features")
    self.cache.check_depth(len(shapes))
    updates = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
    return (jnp.zeros((), jnp.int32),
            (jnp.zeros((x.shape[0],), bool), updates))

  def __call__(self, x, t, y, state):
    count, (valid, updates) = state
    refresh = self.cache.refresh(count, len(updates)) | ~jnp.all(valid)
    new_updates = list(updates)

    def block_fn(i, call, x_in):
      def compute():
        out = call()
        return out, (out - x_in).astype(updates[i].dtype)

      def reuse():  # in the block output's dtype, as compute() returns it
        return (x_in + updates[i]).astype(updates[i].dtype), updates[i]

      out, new_updates[i] = jax.lax.cond(refresh[i], compute, reuse)
      return out

    out = self._apply(x, t, y, block_fn)
    return out, (count + 1, (jnp.ones_like(valid), tuple(new_updates)))
