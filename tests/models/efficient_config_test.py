"""configs/efficient.py: every family builds and runs at the digits size."""
import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import pytest

from jdit.models import build_model

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                     "efficient.py")
_spec = importlib.util.spec_from_file_location("efficient_config", _PATH)
efficient = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(efficient)


def _model(config):
  overrides = {k: v for k, v in config.model.items()
               if k != "name" and v is not None}
  overrides["mixer_options"] = dict(overrides.get("mixer_options") or {})
  return build_model(config.model.name, **overrides)


@pytest.mark.parametrize("family", sorted(efficient.FAMILIES))
def test_digits_family_runs(family):
  c = efficient.get_config(family)
  model = _model(c)
  assert model.mixer == efficient.FAMILIES[family][1]
  s = c.model.input_size
  x = jnp.zeros((2, s, s, c.model.in_channels))
  t, y = jnp.array([3.0, 700.0]), jnp.array([1, 10])
  # Jitted: op-by-op dispatch of an init and a gradient is several times
  # slower on CPU than compiling each once.
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, y)

  def loss(p):
    return jnp.mean(model.apply(p, x, t, y, train=True,
                                rngs={"dropout": jax.random.PRNGKey(1)}) ** 2)

  chex.assert_tree_all_finite(jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize("family", sorted(efficient.FAMILIES))
def test_imagenet_family_builds(family):
  c = efficient.get_config(f"{family},imagenet")
  model = _model(c)
  assert model.mixer == efficient.FAMILIES[family][1]
  assert model.grid_shape == (16, 16)


def test_aliases_and_model_override():
  assert efficient.get_config("dim").model.mixer == "mamba"
  c = efficient.get_config("mamba,imagenet,model=DiM-B/2")
  assert c.model.name == "DiM-B/2"


@pytest.mark.parametrize("arg", [None, "", "nope", "local,foo=1"])
def test_bad_args(arg):
  with pytest.raises(ValueError, match="configs/efficient.py"):
    efficient.get_config(arg)
