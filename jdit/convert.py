"""PyTorch checkpoints -> Flax params: official DiT-family and VAE weights.

`dit_params_from_torch` maps a facebookresearch/DiT state dict (the released
bare EMA dict `DiT-XL-2-256x256.pt`, or a train.py checkpoint with "ema" and
"model"; SiT's, DiT-MoE's and LightningDiT's checkpoints share the layout)
onto the parameter tree of `jdit.models.build_model(name)` (the layout is in
jdit/convert_dit.py);
`vae_params_from_torch` (in jdit.convert_vae) does the same for diffusers'
AutoencoderKL. Both return plain nested dicts of float32 numpy arrays, and
both check the whole checkpoint before converting anything, so a wrong file
fails with one message listing every missing, unexpected and mis-shaped key.

`dit_params_to_torch` goes the other way, for jdit-trained checkpoints
sampled in the PyTorch codebases.

Command line (see jdit/convert_cli.py):

  python -m jdit.convert dit --checkpoint DiT-XL-2-256x256.pt \
      --model DiT-XL/2 --vae sd-vae-ft-ema/ --out converted/dit_xl2_256
  python -m jdit.convert vae --checkpoint diffusion_pytorch_model.safetensors \
      --out converted/sd_vae_ft_ema
  python -m jdit.convert export --checkpoint runs/xl2 --out dit_xl2.pt
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)


# How the checkpoint was trained -> (objective, config.diffusion.flow values)
# of the sampling config it gets.
OBJECTIVES = {
    # DiT and DiT-MoE: ADM's 1000-step diffusion, learned sigma.
    "ddpm": ("ddpm", {}),
    # SiT: linear interpolant in reversed time (t = 1 data), velocity, the
    # network sees t in [0, 1].
    "sit": ("flow", {"path": "linear", "prediction": "velocity",
                     "model_time_flip": True, "model_time_scale": 1.0}),
    # Rectified flow as DiT-MoE's RectifiedFlow: t = 1 noise, velocity
    # noise - data, the network sees t in [0, 1].
    "rf": ("flow", {"path": "linear", "prediction": "velocity",
                    "model_time_flip": False, "model_time_scale": 1.0}),
}


def check_out_dir(out: str) -> str:
  """Fails early (before any work) when --out is taken."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out {out} exists and is not empty")
  return out


@contextlib.contextmanager
def atomic_directory(out: str):
  """Yields a temporary directory that becomes `out` on success."""
  out = check_out_dir(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    yield tmp
    if os.path.isdir(out):
      os.rmdir(out)  # empty, checked above
    os.rename(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not fit the requested model."""


def to_numpy(value) -> np.ndarray:
  """A torch tensor (any float dtype, any device) or array -> numpy float32."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating):
    value = value.astype(np.float32)
  return value


def load_state_dict(path: str) -> dict[str, Any]:
  """Reads a local .pt/.pth/.bin/.ckpt (torch) or .safetensors file.

  torch files are read with weights_only=True on the CPU, so a checkpoint
  cannot run code when loaded. Returns the object stored (usually a dict).
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    try:
      return dict(safetensors.numpy.load_file(path))
    except Exception:  # bf16 tensors need the torch reader
      import safetensors.torch  # pylint: disable=g-import-not-at-top
      return dict(safetensors.torch.load_file(path, device="cpu"))
  if lower.endswith(TORCH_SUFFIXES):
    import torch  # pylint: disable=g-import-not-at-top
    try:
      return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"could not read {path} as a torch checkpoint "
                       f"(weights_only=True): {e}") from e
  raise ValueError(f"unsupported checkpoint file {path}: expected one of "
                   f"{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}")


DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",
                          "diffusion_pytorch_model.bin")


def diffusers_weights(path: str) -> tuple[str, str]:
  """(directory, weight file) of a diffusers model directory (its
  diffusion_pytorch_model.safetensors or .bin) or of a weight file."""
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    return os.path.dirname(os.path.abspath(path)), path
  for name in DIFFUSERS_WEIGHT_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return path, os.path.join(path, name)
  raise FileNotFoundError(f"{path} holds no diffusers weights "
                          f"({' or '.join(DIFFUSERS_WEIGHT_FILES)})")


def unwrap_state_dict(obj: Any, prefer: tuple[str, ...] = ("ema", "model",
                                                           "state_dict")
                      ) -> dict[str, Any]:
  """The weights inside a checkpoint object: a bare dict or a train.py dict.

  DiT's train.py saves {"model", "ema", "opt", "args"}; sampling wants the EMA
  weights, as DiT's own `find_model` does. A "module." prefix (DDP) is removed.
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a "
                     f"dict of tensors")
  for key in prefer:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  sd = dict(obj)
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def check_keys(state_dict: Mapping[str, Any],
               expected: Mapping[str, tuple[int, ...]], what: str,
               ignore: Callable[[str], bool] = lambda k: False) -> None:
  """Raises CheckpointMismatchError naming every key that does not fit."""
  missing = sorted(k for k in expected if k not in state_dict)
  unexpected = sorted(k for k in state_dict
                      if k not in expected and not ignore(k))
  misshaped = sorted(
      f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, expected "
      f"{tuple(expected[k])}"
      for k in expected
      if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(
          expected[k]))
  if missing or unexpected or misshaped:
    parts = [f"checkpoint does not match {what}:"]
    for title, keys in (("missing keys", missing),
                        ("unexpected keys", unexpected),
                        ("mis-shaped keys", misshaped)):
      if keys:
        parts.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
    raise CheckpointMismatchError("\n".join(parts))


def abstract_params(module: nn.Module, *inputs, method=None) -> Any:
  """Unboxed parameter shapes of `module` without allocating them."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), *inputs, method=method))
  return nn.meta.unbox(shapes["params"])


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """tree[path[0]][path[1]]... = value, creating the nested dicts."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def torch_to_flax(value, kind: str) -> np.ndarray:
  """One PyTorch weight in Flax layout, float32.

  kind "conv": Conv2d (out, in, kh, kw) -> (kh, kw, in, out); "linear":
  Linear (out, in) -> Dense (in, out); anything else is kept as it is.
  """
  w = to_numpy(value)
  if kind == "conv":
    w = w.transpose(2, 3, 1, 0)
  elif kind == "linear":
    w = w.T
  return np.ascontiguousarray(w, dtype=np.float32)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _has(tree, path) -> bool:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def resolve_dit_overrides(state_dict: Mapping[str, Any], name: str,
                          **overrides) -> dict:
  """`overrides` plus input_size from pos_embed (see jdit.convert_dit)."""
  from jdit import convert_dit  # pylint: disable=g-import-not-at-top
  return convert_dit.resolve_dit_overrides(state_dict, name, **overrides)


def dit_params_from_torch(state_dict: Mapping[str, Any], name: str,
                          **overrides) -> dict:
  """Official DiT/SiT/DiT-MoE/LightningDiT weights -> Flax params.

  See jdit.convert_dit.dit_params_from_torch for the arguments.
  """
  from jdit import convert_dit  # pylint: disable=g-import-not-at-top
  return convert_dit.dit_params_from_torch(state_dict, name, **overrides)


def dit_params_to_torch(params: Mapping[str, Any], model,
                        name: str = "the model") -> dict[str, np.ndarray]:
  """Flax params of a DiT-layout model -> its official PyTorch state dict
  (numpy float32), the inverse of `dit_params_from_torch`."""
  from jdit import convert_dit  # pylint: disable=g-import-not-at-top
  return convert_dit.dit_params_to_torch(params, model, name)


def vae_params_from_torch(state_dict: Mapping[str, Any], **config) -> dict:
  """diffusers AutoencoderKL weights -> Flax params (see jdit.convert_vae)."""
  from jdit import convert_vae  # pylint: disable=g-import-not-at-top
  return convert_vae.vae_params_from_torch(state_dict, **config)


if __name__ == "__main__":
  from jdit import convert_cli  # pylint: disable=g-import-not-at-top
  convert_cli.main()
