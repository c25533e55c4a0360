"""Run a backbone with a hook around each of its residual blocks.

A block class that sets ``residual_block = True`` returns its input plus an
update of the same shape (DiTBlock, LaMambaBlock). Sampling-time feature
caching (jdit.feature_cache) reuses those updates across steps, depth pruning
(jdit.depth_prune) scales them by a learned layer mask and distillation
(jdit.distill) compares the blocks' outputs with a teacher's. All of them
find the blocks by intercepting their calls, so no model code knows about
them.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

# block_fn(i, call, x_in) -> x_out: how block i runs; call() computes it.
BlockFn = Callable[[int, Callable[[], Any], Any], Any]


def is_residual_block(context) -> bool:
  return (context.method_name == "__call__"
          and getattr(type(context.module), "residual_block", False))


def apply_with_block_hook(model: nn.Module, variables, block_fn: BlockFn,
                          *args, **kwargs):
  """``model.apply(variables, *args, **kwargs)`` with ``block_fn`` deciding
  how the i-th residual block call (in call order) runs."""
  index = [0]

  def intercept(next_fun, call_args, call_kwargs, context):
    if not is_residual_block(context):
      return next_fun(*call_args, **call_kwargs)
    i = index[0]
    index[0] += 1
    return block_fn(i, lambda: next_fun(*call_args, **call_kwargs),
                    call_args[0])

  with nn.intercept_methods(intercept):
    return model.apply(variables, *args, **kwargs)
