"""`python -m jdit.convert export`: a jdit checkpoint for PyTorch.

  python -m jdit.convert export --checkpoint runs/xl2 --out dit_xl2.pt
  python -m jdit.convert export --checkpoint runs/xl2 --out dit_xl2.safetensors
  python -m jdit.convert export --checkpoint runs/xl2 --format diffusers \
      --out dit_xl2_diffusers/

The default format is facebookresearch/DiT's layout (jdit.convert_dit), which
DiT's, SiT's, REPA's, DiT-MoE's and LightningDiT's samplers load: a .pt holds
{"ema": state_dict}, a .safetensors the bare state dict. `--format
diffusers` writes the directory DiTTransformer2DModel.from_pretrained reads
(config.json and diffusion_pytorch_model.safetensors; plain DiTs only). A
note on stderr says how the model was built and which time convention a
sampler must assume.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile

from jdit import convert, convert_dit_diffusers

EXPORT_SUFFIXES = (".pt", ".pth", ".safetensors")
# The OBJECTIVES as the PyTorch codebases that sample them.
SAMPLED_BY = {
    "ddpm": "DiT's 1000-step DDPM (facebookresearch/DiT's and DiT-MoE's "
            "sample.py)",
    "sit": "SiT's flow, t = 1 data (SiT's, REPA's and LightningDiT's "
           "samplers)",
    "rf": "DiT-MoE's rectified flow, t = 1 noise, t in [0, 1]",
}


def pytorch_convention(config) -> str | None:
  """The OBJECTIVES key whose time convention the checkpoint was trained
  in (what a PyTorch sampler must assume), or None for jdit's own."""
  if config.objective == "ddpm":
    return "ddpm"
  flow = config.get("diffusion", {}).get("flow", {})
  for key, (objective, wanted) in convert.OBJECTIVES.items():
    if objective == config.objective and all(
        flow.get(k) == v for k, v in wanted.items()):
      return key
  return None


def export_cmd(args) -> str:
  """A jdit checkpoint's EMA params -> an official-layout PyTorch file, or
  (--format diffusers) a DiTTransformer2DModel directory."""
  diffusers = args.format == "diffusers"
  if diffusers:
    out = convert.check_out_dir(args.out)
  else:
    out = os.path.abspath(os.path.expanduser(args.out))
    if not out.endswith(EXPORT_SUFFIXES):
      raise ValueError(f"--out must end in .pt/.pth (torch.save of "
                       f"{{'ema': state_dict}}, which DiT's, SiT's, REPA's "
                       f"and LightningDiT's loaders read) or .safetensors "
                       f"(the bare state dict), got {args.out}")
    if os.path.exists(out):
      raise FileExistsError(f"--out {out} exists")
  writer = ("safetensors" if diffusers or out.endswith(".safetensors")
            else "torch")
  if importlib.util.find_spec(writer) is None:
    raise ValueError(f"writing {os.path.basename(out)} needs the {writer} "
                     f"package (pip install {writer})")
  from jdit import checkpoint, convert_dit, sampling  # pylint: disable=g-import-not-at-top
  params, config = checkpoint.load_for_sampling(args.checkpoint)
  model, _ = sampling.model_from_config(config)
  state_dict = convert_dit.dit_params_to_torch(params, model,
                                               config.model.name)
  if diffusers:
    try:
      state_dict = convert_dit_diffusers.diffusers_state_dict(
          state_dict, model.depth, model.num_classes)
      model_config = convert_dit_diffusers.diffusers_config(model)
    except ValueError as e:
      raise ValueError(f"{config.model.name} has no diffusers layout: {e}"
                       ) from e
    _write_diffusers(out, state_dict, model_config)
  else:
    _write_file(out, state_dict, writer)
  convention = pytorch_convention(config)
  built = ", ".join(f"{k}={getattr(model, k)!r}" for k in (
      "input_size", "num_classes", "learn_sigma", "depth"))
  print(f"note: {config.model.name} ({built}); trained as "
        + (SAMPLED_BY[convention] if convention else
           f"jdit's flow with {dict(config.diffusion.flow)}, a time "
           f"convention no PyTorch DiT sampler assumes")
        + ("; diffusers embeds timesteps with downscale_freq_shift=1 where "
           "DiT (and jdit) use 0, a small difference its Hub DiT weights "
           "share" if diffusers else ""), file=sys.stderr)
  return out


def _write_file(out: str, state_dict: dict, writer: str) -> None:
  """torch.save({"ema": state_dict}) or the bare safetensors, atomically."""
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-",
                             dir=os.path.dirname(out))
  os.close(fd)
  try:
    if writer == "safetensors":
      import safetensors.numpy  # pylint: disable=g-import-not-at-top
      safetensors.numpy.save_file(state_dict, tmp)
    else:
      import torch  # pylint: disable=g-import-not-at-top
      torch.save({"ema": {k: torch.from_numpy(v)
                          for k, v in state_dict.items()}}, tmp)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_diffusers(out: str, state_dict: dict, model_config: dict) -> None:
  """What DiTTransformer2DModel.save_pretrained writes, atomically."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  with convert.atomic_directory(out) as tmp:
    safetensors.numpy.save_file(state_dict, os.path.join(
        tmp, convert.DIFFUSERS_WEIGHT_FILES[0]))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(model_config, f, indent=2)
