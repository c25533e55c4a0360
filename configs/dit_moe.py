"""DiT-MoE: a mixture-of-experts DiT (Fei et al. 2024), expert-parallel.

    python train.py --config configs/dit_moe.py          # tiny, on digits
    python train.py --config configs/dit_moe.py:imagenet  # S/2-8E2A, latents
    python train.py --config configs/dit_moe.py:imagenet,model=DiT-MoE-B/2-8E2A
    # 8+ devices: experts spread over the `expert` mesh axis
    python train.py --config configs/dit_moe.py:imagenet \
        --config.mesh.expert=8 --config.mesh.data=-1

Built on configs/default.py. Every MLP is an MoE of routed experts (top-2) plus
always-on shared experts; the balance and z losses are added to the training
loss by the trainer (the "aux_loss" collection). The token batch is split
over (data, fsdp, expert); experts are split over `expert` and exchanged with
all-to-all, so `num_experts` must be divisible by `mesh.expert`.
"""

import ml_collections

from jdit.config_util import sibling_config, split_arg
from jdit.models.moe_models import dit_moe_options

def _parse(arg: str | None) -> tuple[str, dict]:
  words, kw = split_arg(arg, __file__, {"model": "DiT-MoE-S/2-8E2A"},
                        words=("digits", "imagenet"))
  return (words[-1] if words else "digits"), kw


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, kw = _parse(arg)
  if variant == "digits":
    c = sibling_config(__file__, "default")
    # Fine-grained experts (width D instead of 4D) keep the CPU run close to
    # the dense default's cost: 8 experts, 2 routed per token, 2 shared.
    c.model.name = kw.get("model", "DiT-MoE-S/2-8E2A")
    c.model.mlp_options = dit_moe_options(c.model.hidden_size, 8,
                                          expert_hidden=c.model.hidden_size)
    return c

  # The DiT ImageNet-256 recipe (configs/dit_imagenet256.py) with a MoE model.
  c = sibling_config(__file__, "dit_imagenet256",
                     f"model={kw.get('model', 'DiT-MoE-S/2-8E2A')}")
  c.total_steps = 400_000
  c.checkpoint_every = 10_000
  # Every device on the expert axis: the batch is still split over it (data
  # parallel outside the MoE), and 8 experts fit 1, 2, 4 or 8 devices.
  c.mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": 1, "tensor": 1, "expert": -1})
  return c
