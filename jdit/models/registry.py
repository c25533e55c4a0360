"""Named models: `build_model("DiT-XL/2", **overrides)`.

A model family registers its names once (`register_model`) with the module
class and the hyperparameters that define each name; overrides replace any
field of the module (input_size, in_channels, num_classes, learn_sigma,
mixer, mixer_options, dtype, param_dtype, remat, ...). With each name the
family also registers its smoke overrides (`smoke_overrides`): the fields
that shrink it to a model that trains in seconds on a CPU, which differ
between families (DiT's depth and width, LaMamba-Diff's stages).
"""
from __future__ import annotations

import dataclasses
import difflib

import flax.linen as nn
import jax.numpy as jnp

from jdit.models import mixers

MODELS: dict[str, tuple[type[nn.Module], dict]] = {}
SMOKE_OVERRIDES: dict[str, dict] = {}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}


def register_model(name: str, cls: type[nn.Module], *, smoke=None,
                   **hparams) -> None:
  """Registers `name` as `cls(**hparams)`; `smoke`: its smoke overrides."""
  if name in MODELS:
    raise ValueError(f"model {name!r} is already registered")
  MODELS[name] = (cls, hparams)
  if smoke is not None:
    SMOKE_OVERRIDES[name] = dict(smoke)


def _check_name(name: str) -> None:
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f" (did you mean {close}?)" if close else ""
    raise ValueError(f"unknown model name {name!r}{hint}; registered: "
                     f"{sorted(MODELS)}")


def smoke_overrides(name: str) -> dict:
  """build_model overrides that shrink model `name` for a CPU smoke run.

  They fit a 64px image (an 8x8 latent), as `bench/train_step.py --smoke`
  uses; input_size and the rest are the caller's.
  """
  _check_name(name)
  if name not in SMOKE_OVERRIDES:
    raise ValueError(f"model {name!r} registered no smoke overrides; pass "
                     f"smoke= to register_model")
  return dict(SMOKE_OVERRIDES[name])


def model_fields(cls: type[nn.Module]) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.init and f.name not in ("parent", "name"))


def as_dtype(value, what: str):
  """Accepts "bfloat16", jnp.bfloat16, np.dtype(...); returns a jnp dtype."""
  if isinstance(value, str):
    if value not in _DTYPES:
      raise ValueError(f"{what} must be one of {sorted(_DTYPES)}, got "
                       f"{value!r}")
    return _DTYPES[value]
  return jnp.dtype(value).type


def build_model(name: str, **overrides) -> nn.Module:
  """Returns the Flax module for a named model.

  Args:
    name: a registered name, e.g. "DiT-XL/2" (all 12 DiT paper variants are
      registered; other families add theirs).
    **overrides: replace module fields, e.g. input_size=32, in_channels=4,
      num_classes=1000, learn_sigma=True, dtype="bfloat16",
      mixer="local", mixer_options={"window": 4}.

  Raises:
    ValueError: unknown name, unknown override, unknown mixer or mixer option.
  """
  _check_name(name)
  cls, hparams = MODELS[name]
  fields = model_fields(cls)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for model {name!r}; "
                     f"allowed: {list(fields)}")
  kwargs = {**hparams, **overrides}
  for key in ("dtype", "param_dtype"):
    if key in kwargs:
      kwargs[key] = as_dtype(kwargs[key], key)
  if "mixer" in fields:
    mixer = kwargs.get("mixer", "attention")
    mixers.get_mixer(mixer)
    mixers.check_mixer_options(mixer, dict(kwargs.get("mixer_options") or {}))
  model = cls(**kwargs)
  validate = getattr(model, "validate", None)
  if validate is not None:
    validate()
  return model
