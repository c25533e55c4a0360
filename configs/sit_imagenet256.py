"""SiT-XL/2 on ImageNet 256x256 latents: the SiT recipe (flow matching).

Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with
Scalable Interpolant Transformers" (2024): the DiT-XL/2 backbone and training
set-up (AdamW lr 1e-4, batch 256, EMA 0.9999, label dropout 0.1, 7M steps for
the headline model) with a linear interpolant, velocity prediction, uniform
training times and no learned sigma. SiT runs time the other way (t = 1 is
data, the network sees t in [0, 1] and predicts data minus noise); its
released weights convert with that convention recorded
(`python -m jdit.convert dit --model DiT-XL/2 --objective sit`, which sets
diffusion.flow.model_time_flip=True and model_time_scale=1.0). jdit's own
default (t = 0 data, network time 1000 t) trains the same model.

    python -m jdit.data.extract_latents ...      # as in dit_imagenet256.py
    python train.py --config configs/sit_imagenet256.py \\
        --config.data.data_dir=/data/latents/imagenet256 \\
        --config.vae.path=/ckpt/sd-vae-ft-ema --workdir runs/sit_xl2_256
    python sample.py --checkpoint runs/sit_xl2_256 --sampler sde --steps 250 \\
        --cfg_scale 1.5                          # SiT's FID-50K setting
    python sample.py --checkpoint runs/sit_xl2_256 --sampler heun --steps 125

Options (arg): the same as configs/dit_imagenet256.py, e.g.
`configs/sit_imagenet256.py:model=DiT-B/2,res=512`; `path=gvp` picks SiT's
GVP interpolant, `time=logit_normal` SD3's training-time distribution.
"""
import ml_collections

from jdit.config_util import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  dit_args, flow = [], {"path": "linear", "time": "uniform"}
  for part in (p for p in (arg or "").split(",") if p):
    key, _, value = part.partition("=")
    if key in flow:
      flow[key] = value
    else:
      dit_args.append(part)
  c = sibling_config(__file__, "dit_imagenet256",
                     ",".join(dit_args) or None)
  c.objective = "flow"
  c.model.learn_sigma = False
  f = c.diffusion.flow
  if flow["path"] not in ("linear", "gvp"):
    raise ValueError(f"configs/sit_imagenet256.py: path must be linear or "
                     f"gvp, got {flow['path']!r}")
  if flow["time"] not in ("uniform", "logit_normal"):
    raise ValueError(f"configs/sit_imagenet256.py: time must be uniform or "
                     f"logit_normal, got {flow['time']!r}")
  f.path = flow["path"]
  f.prediction = "velocity"
  f.time_sampling = flow["time"]
  f.sampler = "sde"                  # SiT's best FID: Euler-Maruyama, 250
  f.steps = 250
  # DiT's "ddpm" is no flow sampler: sample grids and eval use the flow's.
  c.sample.sampler = ""
  c.sample.steps = 0
  # FID-10K during training as in dit_imagenet256.py (off by default):
  #   --config.eval.every=50000 --config.eval.ref=.../VIRTUAL_imagenet256_
  #   labeled.npz --config.eval.inception=.../pt_inception-2015-12-05-
  #   6726825d.pth (samples with sde, 250 steps, no guidance).
  return c
