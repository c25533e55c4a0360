"""TinyFusion: learn which blocks of a pretrained DiT to drop, then recover.

Fang, Li, Ma & Wang, "TinyFusion: Diffusion Transformers Learned Shallow"
(CVPR 2025); see jdit/depth_prune.py (the search) and jdit/distill.py
(Masked KD). Two runs:

1. `search` (the default): the pretrained model's blocks are grouped `group`
   at a time and `keep` of each group survive; which ones is learned with
   Gumbel-softmax layer masks while a LoRA update co-adapts the weights.
   The run ends by writing WORKDIR/pruned (the kept blocks of the original
   weights, a checkpoint sample.py reads) and WORKDIR/depth_prune.json.
2. `finetune`: the shallow model trains from WORKDIR/pruned on the dataset,
   with the denoising loss plus Masked KD from the full model: its output
   and its hidden states (block outputs, massive activations left out).

Digits (the teacher is the `python train.py` default, 4 blocks -> 2):

    python train.py --workdir runs/default
    python train.py --config configs/tinyfusion.py \\
        --config.init_from=runs/default --workdir runs/prune_search
    python train.py --config configs/tinyfusion.py:finetune \\
        --config.init_from=runs/prune_search/pruned \\
        --config.distill.teacher=runs/default --workdir runs/prune_ft
    python sample.py --checkpoint runs/prune_ft --cfg_scale 2

ImageNet 256, DiT-XL/2 (28 blocks) -> TinyDiT-D14 (convert the official
checkpoint first, see README; data and VAE as in configs/dit_imagenet256.py):

    python train.py --config configs/tinyfusion.py:imagenet256 \\
        --config.init_from=/ckpt/dit_xl2_256 \\
        --config.data.data_dir=/data/latents/imagenet256 \\
        --config.vae.path=/ckpt/sd-vae-ft-ema --workdir runs/tinydit_search
    python train.py --config configs/tinyfusion.py:imagenet256,finetune \\
        --config.init_from=runs/tinydit_search/pruned \\
        --config.distill.teacher=/ckpt/dit_xl2_256 \\
        --config.data.data_dir=/data/latents/imagenet256 \\
        --config.vae.path=/ckpt/sd-vae-ft-ema --workdir runs/tinydit_d14

On the digits (CPU, 2026-11-24, the commands above): the teacher's samples
are recognised by the digits classifier 99.6% of the time. The search kept
blocks [0, 2]: 58.0% before fine-tuning, against 22.8% for the other pair
[1, 3]. After the 1000-step fine-tune, 99.8% for the learned choice and for
both fixed pairs. So the digits show that the pipeline works and that the
search picks the better pair before recovery; they are too easy to separate
the choices after it. That comparison needs ImageNet.

Options (comma-separated arg): `search` | `finetune`, `imagenet256`,
`keep=N`, `group=M` (default 1:2; TinyFusion also reports 2:4 and 7:14).

Search recipe (TinyFusion's released script): one epoch of ImageNet at batch
128 (10K steps), AdamW lr 1e-4 without weight decay, gradient clip 1, EMA
0.999, LoRA rank 8. Fine-tune: TinyFusion reports 100K steps ("fast") and
500K steps at DiT's recipe; its Masked KD loss weights are not published in
its repository, so w_out = 1, w_hidden = 0.1 and a massive-activation
threshold of 4 x RMS are jdit's choices.
"""

import ml_collections

from jdit import depth_prune, distill
from jdit.config_util import sibling_config, split_arg


def _parse(arg: str | None) -> dict:
  words, kw = split_arg(arg, __file__, {"keep": "1", "group": "2"},
                        words=("search", "finetune", "imagenet256"))
  if "search" in words and "finetune" in words:
    raise ValueError("configs/tinyfusion.py: choose one of search, finetune")
  for key in ("keep", "group"):
    if not kw[key].isdigit():
      raise ValueError(f"configs/tinyfusion.py: {key} must be a positive "
                       f"integer, got {kw[key]!r}")
  return {"finetune": "finetune" in words,
          "imagenet256": "imagenet256" in words,
          "keep": int(kw["keep"]), "group": int(kw["group"])}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kw = _parse(arg)
  if kw["imagenet256"]:
    c = sibling_config(__file__, "dit_imagenet256")
    c.model.depth = 28             # DiT-XL/2
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.log_every = 100
    if kw["finetune"]:
      c.total_steps = 500_000      # TinyFusion: 100K (fast) or 500K
      c.batch_size = 256
      c.checkpoint_every = 10_000
      c.ema_decay = 0.9999
    else:
      c.total_steps = 10_000       # one epoch at batch 128
      c.batch_size = 128
      c.checkpoint_every = 1000
      c.ema_decay = 0.999
  else:
    c = sibling_config(__file__, "default")
    if kw["finetune"]:
      c.total_steps = 1000
      c.checkpoint_every = 500
    else:
      c.total_steps = 300
      c.checkpoint_every = 100
      c.optim.lr = 1e-3
      c.optim.warmup_steps = 0
      c.optim.schedule = "constant"
  c.init_from = ""                 # required: the model to prune / the
  #                                  pruned model to fine-tune
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0

  if kw["finetune"]:
    if c.model.depth * kw["keep"] % kw["group"]:
      raise ValueError(f"configs/tinyfusion.py: keep={kw['keep']} of "
                       f"group={kw['group']} does not divide depth "
                       f"{c.model.depth}")
    c.model.depth = c.model.depth * kw["keep"] // kw["group"]
    c.distill = d = distill.default_config()
    d.teacher = ""                 # required: the unpruned model
    d.num_samples = 0              # train on config.data, not teacher samples
    d.trainable = ".*"             # every parameter
    d.w_denoise = 1.0
    d.w_out = 1.0                  # output KD
    d.w_attn = 0.0
    d.w_hidden = 0.1               # hidden-state KD (blocks differ in number)
    d.massive_threshold = 4.0      # entries > 4 x RMS are massive
  else:
    c.depth_prune = p = depth_prune.default_config()
    p.keep, p.group = kw["keep"], kw["group"]
  return c
