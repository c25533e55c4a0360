"""Named DiT-MoE models: `build_model("DiT-MoE-XL/2-8E2A", **overrides)`.

Sizes follow Table 1 of Fei et al., "Scaling Diffusion Transformers to 16
Billion Parameters" (arXiv 2407.11633) and feizc/DiT-MoE `models.py`: the
DiT backbone of each size with every MLP replaced by an MoE of E routed
SwiGLU experts of width 4D (top-2, "8E2A" = 8 experts, 2 activated) plus two
shared experts fused into one SwiGLU of width 2D, a bias-free router and the
expert-level balance loss with alpha = 0.01. Parameter counts (see
`param_counts`) agree with the paper's totals and activated counts.

Differences from the paper's code: training routes with a capacity (factor
1.25 by default; override `mlp_options`) where the PyTorch loop never drops
tokens (sampling drops none, as there), and the router z-loss (1e-3) is on.
"""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit.models.dit import DIT_SMOKE, DiT
from jdit.models.moe import ROUTED_PARAMS
from jdit.models.registry import register_model

# name: (depth, hidden, heads, experts, paper total, paper activated)
DIT_MOE_SIZES = {
    "DiT-MoE-S/2-8E2A": (12, 384, 6, 8, 199e6, 71e6),
    "DiT-MoE-S/2-16E2A": (12, 384, 6, 16, 369e6, 71e6),
    "DiT-MoE-B/2-8E2A": (12, 768, 12, 8, 795e6, 286e6),
    "DiT-MoE-L/2-8E2A": (24, 1024, 16, 8, 2.8e9, 1.0e9),
    "DiT-MoE-XL/2-8E2A": (28, 1152, 16, 8, 4.1e9, 1.5e9),
    "DiT-MoE-G/2-16E2A": (40, 1408, 16, 16, 16.5e9, 3.1e9),
}


def dit_moe_options(hidden_size: int, num_experts: int, top_k: int = 2,
                    **overrides) -> dict:
  """The MoE `mlp_options` of a DiT-MoE model of this width."""
  return {**dict(num_experts=num_experts, top_k=top_k, num_shared_experts=2,
                shared_expert_hidden=hidden_size, expert_act="swiglu",
                balance_loss_weight=0.01), **overrides}


for _name, (_depth, _width, _heads, _experts, _, _) in DIT_MOE_SIZES.items():
  register_model(_name, DiT, depth=_depth, hidden_size=_width,
                 num_heads=_heads, patch_size=2, mlp="moe",
                 mlp_options=dit_moe_options(_width, _experts),
                 smoke={**DIT_SMOKE, "mlp_options": dit_moe_options(
                     DIT_SMOKE["hidden_size"], _experts)})


def param_counts(model, input_size: int | None = None) -> tuple[int, int]:
  """(total, activated per token) trainable parameters, without allocating.

  Activated counts, in every MoE layer, top_k of the num_experts routed
  experts (shared experts and everything else always run).
  """
  size = input_size or model.input_size
  size = (size, size) if isinstance(size, int) else tuple(size)
  x = jax.ShapeDtypeStruct((1, *size, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(
      lambda x, t, y: model.init(jax.random.key(0), x, t, y), x, t, y)
  total, routed = 0, 0
  params = flax.traverse_util.flatten_dict(nn.unbox(shapes["params"]))
  for path, leaf in params.items():
    n = int(np.prod(leaf.shape))
    total += n
    if path[-1] in ROUTED_PARAMS:
      routed += n
  if model.mlp != "moe":
    return total, total
  moe = model.feedforward()
  e, k = moe.num_experts, moe.top_k
  return total, total - routed * (e - k) // e
