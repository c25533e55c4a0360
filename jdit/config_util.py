"""Loading Python config files by path.

Config files live in configs/ (not a package: config_flags runs them from a
path), and several build on another one, e.g. ImageNet on the default.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(path: str, arg: str | None = None
                ) -> ml_collections.ConfigDict:
  """Runs the config file at `path` and returns get_config(arg)."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  name = "jdit_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def sibling_config(config_file: str, name: str, arg: str | None = None
                   ) -> ml_collections.ConfigDict:
  """get_config(arg) of configs/<name>.py next to `config_file` (__file__)."""
  return load_config(
      os.path.join(os.path.dirname(os.path.abspath(config_file)),
                   f"{name}.py"), arg)


def split_arg(arg: str | None, config_file: str, keys: dict[str, str],
              words: tuple[str, ...] = ()
              ) -> tuple[list[str], dict[str, str]]:
  """A config file's argument ("configs/x.py:imagenet,model=DiT-B/2") split
  into its bare words and its key=value options.

  Args:
    arg: the text after ":" (None or "" for none).
    config_file: the config's __file__, named in errors.
    keys: the allowed keys with their defaults (returned when not given).
    words: the allowed bare words.

  Returns:
    (the words given, in order; {key: value} for every key).

  Raises:
    ValueError: a word or key that is not allowed, or a key without a
      value; names everything that is allowed.
  """
  given, values = [], dict(keys)
  for part in (p.strip() for p in (arg or "").split(",") if p.strip()):
    key, eq, value = part.partition("=")
    if eq and key in keys and value:
      values[key] = value
      continue
    if not eq and part in words:
      given.append(part)
      continue
    allowed = [*words, *(f"{k}=..." for k in keys)]
    raise ValueError(
        f"configs/{os.path.basename(config_file)}: bad option {part!r}; "
        f"allowed: {', '.join(allowed) or 'none'}")
  return given, values
