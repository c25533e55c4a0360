"""The built-in default: a small class-conditional DiT on the offline digits.

    python train.py                                  # this config, ddpm
    python train.py --config.objective=flow          # rectified flow instead
    python train.py --config configs/default.py --config.total_steps=500

Trains on the 1,797 8x8 handwritten digits that scikit-learn ships (no
network), prepared once as a TFDS dataset, and writes a sample grid per class.
Sized to reach recognisable digits in under 10 minutes on a 2-core CPU.
"""
import ml_collections

from jdit import diffusion, repa


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128               # global, across all devices and hosts
  c.total_steps = 1500
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 3           # the last k checkpoints are kept
  c.objective = "ddpm"             # "ddpm" (ADM/DiT) or "flow" (SiT/RF)
  c.init_from = ""                 # start a new run from these params (any
  #                                  checkpoint sample.py reads); "" = init

  c.model = ml_collections.ConfigDict()
  c.model.name = "DiT-S/2"         # any build_model name; fields below override
  c.model.input_size = 8
  c.model.in_channels = 1
  c.model.num_classes = 10
  c.model.depth = 4
  c.model.hidden_size = 192
  c.model.num_heads = 3
  c.model.patch_size = 2
  c.model.learn_sigma = ml_collections.FieldReference(None, field_type=bool)
  c.model.class_dropout_prob = 0.1
  c.model.dtype = "float32"        # compute dtype; params stay float32
  c.model.remat = "none"           # none | full | dots_saveable | offload

  c.diffusion = diffusion.default_config()

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"           # see jdit.data.DATASETS
  c.data.data_dir = ""             # TFDS data dir; "" = ~/tensorflow_datasets
  c.data.split = "train"
  c.data.flip = False              # random horizontal flips (never for digits)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0          # global-norm clip; 0 disables
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"      # constant | cosine (after warmup)
  c.optim.grad_accum = 1           # micro-batches per step (same result)
  c.ema_decay = 0.999
  c.ema_warmup = True              # decay min(0.999, (1+step)/(10+step))
  # REPA (jdit/repa.py): align the tokens after block `depth` with DINOv2
  # features of the clean image; off while weight = 0.
  c.repa = repa.default_config()

  # Post-hoc EMA (EDM2): power-function EMAs of these relative widths, saved
  # every `every` steps under workdir/posthoc_ema/; any other width is made
  # after training by `python -m jdit.posthoc_ema`. 0 = off.
  c.posthoc_ema = ml_collections.ConfigDict(
      {"every": 0, "sigma_rels": (0.05, 0.10)})

  # Mesh axis sizes; -1 takes the remaining devices. Logical -> mesh rules
  # live in jdit.sharding (override with c.axis_rules).
  c.mesh = ml_collections.ConfigDict(
      {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})

  c.sample = ml_collections.ConfigDict()
  c.sample.per_class = 8           # grid: one row per class
  c.sample.sampler = ""            # "" = the objective's default
  c.sample.steps = 0               # 0 = the objective's default
  c.sample.cfg_scale = 2.0

  # FID (and Inception Score) of EMA samples during training, logged to
  # metrics.jsonl/TensorBoard as eval/fid, eval/inception_score. Off when
  # every = 0; to enable: --config.eval.every=500 --config.eval.ref=REF.npz
  # --config.eval.inception=pt_inception-2015-12-05-6726825d.pth (a reference
  # for the digits: `python -m jdit.metrics.fid --write_ref`).
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0                 # steps between evaluations (and the last)
  c.eval.num_samples = 10_000      # FID-10K
  c.eval.ref = ""                  # ADM reference batch .npz (mu, sigma)
  c.eval.inception = ""            # local pt_inception-2015-12-05-6726825d.pth
  c.eval.dinov2 = ""               # also eval/fd_dinov2 (EDM2) with this
  #                                  dinov2_vitl14_pretrain.pth; ref needs
  #                                  mu_dinov2/sigma_dinov2 (--write_ref)
  c.eval.batch_size = 128          # images per sampling/Inception batch
  c.eval.sampler = ""              # "" = sample.sampler
  c.eval.steps = 0                 # 0 = sample.steps
  c.eval.cfg_scale = ml_collections.FieldReference(None, field_type=float)
  #                                  None = sample.cfg_scale
  c.eval.keep_best = True          # EMA params of the lowest FID kept in
  #                                  workdir/best_fid (sample.py loads it)
  return c
