"""`python -m jdit.convert {dit,vae,export}`: PyTorch <-> jdit checkpoints.

  python -m jdit.convert dit --checkpoint DiT-XL-2-256x256.pt \
      --model DiT-XL/2 [--image_size 256] [--vae sd-vae-ft-ema/] --out DIR
  python -m jdit.convert dit --checkpoint SiT-XL-2-256x256.pt \
      --model DiT-XL/2 --objective sit --vae sd-vae-ft-ema/ --out DIR
  python -m jdit.convert dit --checkpoint DiT-XL-2-256/transformer \
      --model DiT-XL/2 --vae DiT-XL-2-256/vae --out DIR     # the Hub's
  python -m jdit.convert vae \
      --checkpoint diffusion_pytorch_model.safetensors --out DIR
  python -m jdit.convert vae \
      --checkpoint vavae-imagenet256-f16d32-dinov2.pt \
      --latent_stats latents_stats.pt --out DIR

`dit` writes a checkpoint that `python sample.py --checkpoint DIR` loads (the
converted weights as EMA params, the config of configs/dit_imagenet256.py
with this model); with --vae the VAE is converted too, into DIR/vae, and the
config points at it. `vae` writes vae_config.json + params.msgpack, which
`jdit.vae.load_vae` reads. `export` goes the other way: a jdit DiT-family
checkpoint's EMA params in the official layout, for facebookresearch/DiT's
sample.py (and SiT's, REPA's, DiT-MoE's, LightningDiT's):

  python -m jdit.convert export --checkpoint runs/xl2 --out dit_xl2.pt
  python -m jdit.convert export --checkpoint runs/xl2 --format diffusers \
      --out dit_xl2_diffusers/            # DiTTransformer2DModel (the Hub's)

Output appears atomically: everything is written
into a temporary directory beside DIR, which is renamed when complete.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys

import ml_collections

from jdit import (convert, convert_dit_diffusers, convert_export, convert_vae,
                  vae as vae_lib)
from jdit.models import build_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIGS = ("dit_imagenet256.py", "default.py")
def base_config(model_name: str, image_size: int | None
                ) -> ml_collections.ConfigDict:
  """The DiT ImageNet recipe's config (configs/dit_imagenet256.py).

  Asks for `model=<name>,res=<image_size>` (res=512 selects the 512 recipe),
  falling back to fewer options for sizes the recipe does not know, and to
  configs/default.py where the recipe file is absent.
  """
  for name in BASE_CONFIGS:
    path = os.path.join(REPO_ROOT, "configs", name)
    if not os.path.isfile(path):
      continue
    spec = importlib.util.spec_from_file_location(f"_jdit_cfg_{name[:-3]}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [f"model={model_name}", None]
    if image_size is not None:
      args.insert(0, f"model={model_name},res={image_size}")
    for arg in args:
      try:
        return module.get_config(arg)
      except ValueError:
        continue
  raise FileNotFoundError(f"no base config {BASE_CONFIGS} under "
                          f"{REPO_ROOT}/configs")


def sampling_config(name: str, model, overrides: dict, vae_path: str | None,
                    scale_factor: float, image_size: int | None = None,
                    objective: str = "ddpm") -> ml_collections.ConfigDict:
  """The base recipe's config, with model.* describing `model` exactly.

  `objective`: a key of OBJECTIVES, how the checkpoint was trained.
  """
  config = base_config(name, image_size)
  with config.unlocked():
    old = config.get("model", ml_collections.ConfigDict())
    config.model = ml_collections.ConfigDict()
    config.model.name = name
    # Keep every model field the recipe sets, but with the converted model's
    # value, so that overrides in the recipe cannot contradict the weights.
    for key in list(old.keys()) + ["input_size", "in_channels",
                                   "num_classes", "learn_sigma"] + list(
                                       overrides):
      if key == "name" or not hasattr(model, key):
        continue
      value = getattr(model, key)
      if key in ("dtype", "param_dtype"):
        # The published FIDs were sampled in float32; the recipe's bfloat16
        # is a training setting. --override dtype=bfloat16 samples faster.
        value = overrides.get(key, "float32")
      elif isinstance(value, tuple):
        value = list(value)
      config.model[key] = value
    config.objective, flow = convert.OBJECTIVES[objective]
    config.diffusion.flow.update(flow)
    if model.in_channels == 3 and vae_path is None:
      if "vae" in config:
        del config["vae"]
    else:
      config.vae = ml_collections.ConfigDict(
          {"path": vae_path or "", "scale_factor": scale_factor})
  return config


def parse_override(text: str) -> tuple[str, object]:
  """"depth=2" -> ("depth", 2); values are Python literals or strings."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ValueError(f"--override must be key=value, got {text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def _diffusers_dit(sd, directory: str, args) -> dict:
  """A DiTTransformer2DModel's weights in the official layout; its latent
  side from --input_size, else config.json's sample_size."""
  size = args.input_size
  if size is None:
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
      raise ValueError(f"{args.checkpoint} holds diffusers DiT weights "
                       f"without the config.json beside them; give the "
                       f"latent side with --input_size")
    with open(config) as f:
      size = json.load(f).get("sample_size")
  return convert_dit_diffusers.official_state_dict(sd, int(size))


def convert_dit(args) -> str:
  convert.check_out_dir(args.out)
  directory, weights = convert.diffusers_weights(args.checkpoint)
  sd = convert.load_state_dict(weights)
  if convert_dit_diffusers.is_diffusers_dit(sd):
    sd = _diffusers_dit(sd, directory, args)
  overrides = dict(parse_override(o) for o in args.override)
  for key in ("in_channels", "num_classes", "input_size"):
    if getattr(args, key) is not None:
      overrides[key] = getattr(args, key)
  if args.learn_sigma is not None:
    overrides["learn_sigma"] = args.learn_sigma == "true"
  vae_model = vae_params = None
  scale = args.scale_factor
  if args.vae:
    vae_model, vae_params = _load_vae(args.vae, args.latent_stats)
    scale = scale if scale is not None else vae_model.scale_factor
  elif args.latent_stats:
    raise ValueError("--latent_stats describes the VAE's latents; it needs "
                     "--vae (the VAE's weights)")
  if args.image_size is not None and "input_size" not in overrides:
    factor = vae_model.downsample_factor if vae_model is not None else 8
    if overrides.get("in_channels") == 3 and vae_model is None:
      factor = 1  # a pixel-space model
    if args.image_size % factor:
      raise ValueError(f"--image_size {args.image_size} is not divisible by "
                       f"the VAE factor {factor}")
    overrides["input_size"] = args.image_size // factor
  overrides = convert.resolve_dit_overrides(sd, args.model, **overrides)
  params = convert.dit_params_from_torch(sd, args.model, **overrides)
  model = build_model(args.model, **overrides)
  from jdit import checkpoint  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(os.path.expanduser(args.out))
  with convert.atomic_directory(out) as tmp:
    vae_path = None
    if vae_model is not None:
      os.makedirs(os.path.join(tmp, "vae"))
      vae_lib.save_vae(os.path.join(tmp, "vae"),
                       vae_model.clone(scale_factor=scale), vae_params)
      vae_path = os.path.join(out, "vae")  # where it will be after rename
    factor = vae_model.downsample_factor if vae_model is not None else 8
    image_size = (model.input_size * factor
                  if isinstance(model.input_size, int) else None)
    config = sampling_config(args.model, model, overrides, vae_path,
                             scale if scale is not None
                             else vae_lib.SD_VAE_SCALE_FACTOR, image_size,
                             args.objective)
    checkpoint.save_for_sampling(tmp, params, config)
  if (args.model.startswith("LightningDiT") and vae_model is not None
      and vae_model.latents_mean is None):
    print(f"note: {args.vae} has no per-channel latent statistics; "
          f"LightningDiT's samples decode right only with VA-VAE's "
          f"(--latent_stats latents_stats.pt)", file=sys.stderr)
  if model.in_channels != 3 and vae_model is None:
    print(f"note: {args.model} is a latent model and no --vae was given; "
          f"set vae.path in the config (or re-run with --vae) to decode "
          f"samples", file=sys.stderr)
  return out


def _load_vae(path: str, latent_stats: str | None):
  """--vae as (module, params); --latent_stats applies to raw weights only,
  as `convert vae --latent_stats` would."""
  if not latent_stats:
    return vae_lib.load_vae(path)[:2]
  if os.path.isfile(os.path.join(os.path.expanduser(path),
                                 vae_lib.CONFIG_FILE)):
    raise ValueError(
        f"--vae {path} is a converted VAE, whose latent statistics were "
        f"fixed when it was converted; drop --latent_stats, or convert the "
        f"weights again with `python -m jdit.convert vae --latent_stats`")
  return convert_vae.load_diffusers_vae(path, latent_stats=latent_stats)


def convert_vae_cmd(args) -> str:
  convert.check_out_dir(args.out)
  model, params = convert_vae.load_diffusers_vae(
      args.checkpoint, scale_factor=args.scale_factor,
      norm_num_groups=args.norm_num_groups, latent_stats=args.latent_stats)
  with convert.atomic_directory(args.out) as tmp:
    vae_lib.save_vae(tmp, model, params)
  return os.path.abspath(args.out)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m jdit.convert",
      description="Convert PyTorch checkpoints to jdit checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True)
  d = sub.add_parser("dit", help="official facebookresearch/DiT checkpoint")
  d.add_argument("--checkpoint", required=True,
                 help="DiT-XL-2-256x256.pt, a DiT train.py checkpoint, or "
                      "diffusers' DiTTransformer2DModel (the Hub's "
                      "facebook/DiT-XL-2-256/transformer directory)")
  d.add_argument("--model", required=True,
                 help='e.g. "DiT-XL/2" (DiT, SiT) or "DiT-MoE-S/2-8E2A"')
  d.add_argument("--objective", choices=sorted(convert.OBJECTIVES),
                 default="ddpm",
                 help="how the checkpoint was trained: ddpm (DiT, DiT-MoE), "
                      "sit (SiT's flow matching), rf (DiT-MoE's rectified "
                      "flow)")
  d.add_argument("--image_size", type=int, default=None,
                 help="image side (256 or 512); default: from pos_embed")
  d.add_argument("--input_size", type=int, default=None,
                 help="latent side; overrides --image_size")
  d.add_argument("--in_channels", type=int, default=None)
  d.add_argument("--num_classes", type=int, default=None)
  d.add_argument("--learn_sigma", choices=("true", "false"), default=None)
  d.add_argument("--override", action="append", default=[],
                 metavar="KEY=VALUE",
                 help="another build_model override, e.g. depth=2 "
                      "(repeatable), for checkpoints of non-standard sizes")
  d.add_argument("--vae", default=None,
                 help="diffusers VAE (directory or weight file) or a "
                      "directory from `jdit.convert vae`; copied to DIR/vae")
  d.add_argument("--scale_factor", type=float, default=None,
                 help="latent scale (default: the VAE's, 0.18215)")
  d.add_argument("--latent_stats", default=None,
                 help="with --vae weights: the per-channel latent mean/std "
                      "the model was trained with (LightningDiT's "
                      "latents_stats.pt), as for `convert vae`")
  d.add_argument("--out", required=True)
  v = sub.add_parser("vae", help="diffusers or CompVis/LDM AutoencoderKL "
                                 "weights (SD-VAE, VA-VAE)")
  v.add_argument("--checkpoint", required=True,
                 help="diffusion_pytorch_model.safetensors/.bin or its "
                      "directory, or an LDM checkpoint (VA-VAE's .pt, an SD "
                      ".ckpt: its first_stage_model)")
  v.add_argument("--norm_num_groups", type=int, default=None,
                 help="GroupNorm groups (default: config.json's, else 32)")
  v.add_argument("--latent_stats", default=None,
                 help="per-channel latent mean/std the diffusion models "
                      "normalise by, e.g. LightningDiT's latents_stats.pt "
                      "(keys 'mean', 'std')")
  v.add_argument("--scale_factor", type=float, default=None,
                 help="latent scale, applied after --latent_stats (default: "
                      "config.json's, else 1.0 with --latent_stats, else "
                      "0.18215)")
  v.add_argument("--out", required=True)
  e = sub.add_parser("export", help="a jdit DiT-family checkpoint -> the "
                                    "official PyTorch or diffusers layout "
                                    "(jdit/convert_export.py)")
  e.add_argument("--checkpoint", required=True,
                 help="a workdir, its checkpoints/ or one step's directory, "
                      "or a converted or pruned checkpoint (EMA params)")
  e.add_argument("--format", choices=("official", "diffusers"),
                 default="official",
                 help="official: facebookresearch/DiT's state dict; "
                      "diffusers: a DiTTransformer2DModel directory")
  e.add_argument("--out", required=True,
                 help="FILE.pt or FILE.safetensors; with --format diffusers "
                      "a new directory")
  args = parser.parse_args(argv)
  commands = {"dit": convert_dit, "vae": convert_vae_cmd,
              "export": convert_export.export_cmd}
  try:
    out = commands[args.command](args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(out)
