"""LightningDiT-XL/1 on ImageNet 256x256 VA-VAE latents: LightningDiT's recipe.

Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in
Latent Diffusion Models" (2025): a DiT with SwiGLU, RMSNorm and 2D RoPE on
the 16x16x32 latents of VA-VAE (f16d32), trained by rectified flow with
logit-normal times and a cosine term on the velocity direction, at batch 1024
with AdamW (lr 2e-4, betas 0.9 / 0.95). Its published FIDs: 2.11 after 64
epochs (80K steps, the total here) and 1.35 after 800.

1. Convert VA-VAE with its latent statistics (per-channel mean and std,
   stored with the VAE), then encode ImageNet once; latent_stats.json in
   --out records the shape and that normalisation, which the dataset
   "latents" reads (no registration):

     python -m jdit.convert vae --checkpoint vavae-imagenet256-f16d32-dinov2.pt \\
         --latent_stats latents_stats.pt --out /ckpt/vavae-f16d32
     python -m jdit.data.extract_latents --source folder \\
         --folder /data/imagenet/train --image_size 256 \\
         --vae /ckpt/vavae-f16d32 --out /data/latents/vavae256

2. Train (any number of devices; re-running the command resumes exactly):

     python train.py --config configs/lightningdit_imagenet256.py \\
         --config.data.data_dir=/data/latents/vavae256 \\
         --config.vae.path=/ckpt/vavae-f16d32 --workdir runs/lightningdit_xl1

   Other sizes: `configs/lightningdit_imagenet256.py:model=LightningDiT-B/1`.

3. Sample with LightningDiT's settings (euler, 250 steps, its timestep shift
   0.3 = our sample_shift 1/0.3, stored in the checkpoint's config; guidance
   only for t <= 0.89; cfg 10.0 at 64 epochs, 6.7 at 800):

     python sample.py --checkpoint runs/lightningdit_xl1 --cfg_scale 10 \\
         --cfg_interval 0,0.89

Choices of ours: compute in bfloat16 (params and optimizer in float32, as
LightningDiT's mixed precision); label dropout 0.1 (DiT's); the network sees
t = 0 as data (LightningDiT/SiT run time the other way; the two are the
same model up to that convention, see configs/sit_imagenet256.py).
LightningDiT clips no gradients and warms up nothing; neither does this.
"""
import ml_collections

from jdit.config_util import sibling_config, split_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  _, kw = split_arg(arg, __file__, {"model": "LightningDiT-XL/1"})
  c = sibling_config(__file__, "dit_imagenet256", f"model={kw['model']}")
  c.batch_size = 1024                # global
  c.total_steps = 80_000             # 64 epochs of ImageNet at batch 1024
  c.checkpoint_every = 20_000
  c.objective = "flow"

  c.model.input_size = 16            # VA-VAE downsamples 16x ...
  c.model.in_channels = 32           # ... into 32 channels
  c.model.learn_sigma = False

  f = c.diffusion.flow
  f.path = "linear"
  f.prediction = "velocity"
  f.time_sampling = "logit_normal"   # "lognorm": sigmoid of N(0, 1)
  f.logit_mean, f.logit_std = 0.0, 1.0
  f.cosine_loss = 1.0                # MSE + mean(1 - cos(v_pred, v))
  f.sampler = "euler"
  f.steps = 250
  f.sample_shift = 1.0 / 0.3         # its timestep_shift 0.3, our time

  c.data.name = "latents"            # shape and normalisation from the files
  c.vae = ml_collections.ConfigDict()
  c.vae.path = ""                    # the converted VA-VAE, for decoding

  # From the DiT recipe: b1 0.9, no weight decay, clipping or warmup, a
  # constant schedule, EMA 0.9999 without warmup, as LightningDiT.
  c.optim.lr = 2e-4
  c.optim.b2 = 0.95

  c.sample.sampler = ""              # the flow's: euler, 250 steps
  c.sample.steps = 0
  c.sample.cfg_scale = 10.0
  c.eval.batch_size = 1024
  return c
