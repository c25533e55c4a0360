"""Efficient DiT families: the DiT backbone with a sparse token mixer.

    python train.py --config configs/efficient.py:local      # digits, CPU
    python train.py --config configs/efficient.py:window
    python train.py --config configs/efficient.py:linear
    python train.py --config configs/efficient.py:mamba
    python train.py --config configs/efficient.py:proxy
    python train.py --config configs/efficient.py:kv_compress
    # ImageNet 256 latents with the named model of the family (paper options)
    python train.py --config configs/efficient.py:local,imagenet
    python train.py --config configs/efficient.py:mamba,imagenet,model=DiM-B/2

Built on configs/default.py. The digits variant keeps the default's tiny
DiT (8x8 images, a 4x4 token grid) and only swaps the mixer, with options
sized for that grid; the imagenet variant uses the family's registered model
(jdit/models/families.py) at 256px with its paper hyperparameters.
"""

import ml_collections

from jdit.config_util import sibling_config, split_arg

# family -> (named model at 256px, mixer, mixer options for the 4x4 digits
# token grid).
FAMILIES = {
    "local": ("DiT-XL/2-local", "local", {"window": 2, "shape": "circle"}),
    "window": ("DiT-XL/2", "window", {"window": 2, "shift": 1}),
    "linear": ("DiT-XL/2-linear", "linear",
               {"feature_map": "relu", "conv_kernel": 3}),
    "mamba": ("DiM-XL/2", "mamba",
              {"state": 16, "expand": 2, "d_conv": 4, "scan_order": "zigzag",
               "bidirectional": True}),
    "proxy": ("PT-DiT-XL/2", "proxy",
              {"proxy_window": 2, "window": 2, "shift": 1}),
    "kv_compress": ("DiT-XL/2-KVCompress", "kv_compress", {"ratio": 2}),
}
ALIASES = {"dim": "mamba", "pt-dit": "proxy", "ptdit": "proxy",
           "kvc": "kv_compress", "kvcompress": "kv_compress", "clear": "local"}


def _parse(arg):
  words, kw = split_arg(arg, __file__, {"model": ""},
                        words=("digits", "imagenet", *FAMILIES, *ALIASES))
  families = [ALIASES.get(w, w) for w in words if w in FAMILIES or w in ALIASES]
  if len(families) != 1:
    raise ValueError(f"configs/efficient.py: pick one family with "
                     f"':<family>', one of {sorted(FAMILIES)} (aliases "
                     f"{sorted(ALIASES)}), got {arg!r}")
  variant = "imagenet" if "imagenet" in words else "digits"
  return families[0], variant, {k: v for k, v in kw.items() if v}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  family, variant, kw = _parse(arg)
  named, mixer, digits_options = FAMILIES[family]
  if variant == "digits":
    c = sibling_config(__file__, "default")
    # Same tiny DiT as the default; only the token mixer changes.
    c.model.mixer = mixer
    c.model.mixer_options = dict(digits_options)
    if "model" in kw:
      c.model.name = kw["model"]
    return c

  # The DiT ImageNet-256 recipe (configs/dit_imagenet256.py); the named
  # model carries the paper's mixer and options.
  c = sibling_config(__file__, "dit_imagenet256",
                     f"model={kw.get('model', named)}")
  if family == "window":
    c.model.mixer = "window"
    c.model.mixer_options = {"window": 8, "shift": 4}
  c.total_steps = 400_000
  c.checkpoint_every = 10_000
  return c
