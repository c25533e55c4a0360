"""Autoguidance through sampling.Sampler, and which guides are refused."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdit import diffusion, sampling, sharding
from jdit.models import build_model
from tests.conftest import random_params

SIZE, CHANNELS, CLASSES, B = 8, 4, 10, 8
SMALL = dict(input_size=SIZE, in_channels=CHANNELS, num_classes=CLASSES,
             hidden_size=64, num_heads=4, learn_sigma=False)


def _config(objective="flow", **flow):
  return ml_collections.ConfigDict({"objective": objective, "diffusion": {
      "flow": flow}})


@pytest.fixture(scope="module")
def setup():
  model = build_model("DiT-S/2", depth=2, **SMALL)
  guide = build_model("DiT-S/2", depth=1, **SMALL)  # smaller, as intended
  objective = diffusion.create("flow", None, learn_sigma=False)
  mesh = sharding.create_mesh({"data": -1})
  return (model, random_params(model, seed=0), guide,
          random_params(guide, seed=1), objective, mesh)


def _sample(setup, guidance, guide, steps):
  model, params, _, _, objective, mesh = setup
  sampler = sampling.Sampler(model, objective, params, mesh=mesh,
                             sampler="euler", steps=steps, guidance=guidance,
                             guide=guide)
  return sampler(jax.random.key(3), np.arange(B) % CLASSES)


def test_one_euler_step_is_the_autoguided_velocity(setup):
  """From t = 1 one Euler step gives noise - v, v = g + w (v_model - g)."""
  model, params, guide, guide_params, objective, _ = setup
  w = 2.5
  x = _sample(setup, diffusion.Guidance(w, CLASSES), (guide, guide_params), 1)
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(3), 0),
                            (B, SIZE, SIZE, CHANNELS))
  y = jnp.arange(B) % CLASSES
  t = objective.model_time(jnp.ones(B))
  v = model.apply({"params": params}, noise, t, y)
  g = guide.apply({"params": guide_params}, noise, t, y)
  np.testing.assert_allclose(x, noise - (g + w * (v - g)), rtol=1e-4,
                             atol=1e-4)
  cfg = _sample(setup, diffusion.Guidance(w, CLASSES), None, 1)
  assert np.abs(x - cfg).max() > 0.1  # not classifier-free guidance


def test_the_model_guiding_itself_is_unguided(setup):
  model, params = setup[:2]
  plain = _sample(setup, None, None, 3)
  itself = _sample(setup, diffusion.Guidance(4.0, CLASSES),
                   (model, params), 3)
  np.testing.assert_allclose(itself, plain, rtol=1e-5, atol=1e-5)


def test_check_guide_names_every_mismatch(setup):
  model, _, guide = setup[:3]
  ok = _config(model_time_scale=1.0)
  sampling.check_guide(ok, model, _config(model_time_scale=1.0), guide)
  with pytest.raises(ValueError, match="objective 'ddpm', the model's is "
                                       "'flow'"):
    sampling.check_guide(ok, model, _config("ddpm"), guide)
  with pytest.raises(ValueError, match=r"model_time_scale 1000.0, the "
                                       r"model's is 1.0.*model_time_flip"):
    sampling.check_guide(ok, model, _config(model_time_flip=True), guide)
  other = build_model("DiT-S/2", depth=1, **dict(SMALL, num_classes=5,
                                                 input_size=16))
  with pytest.raises(ValueError, match=r"input_shape \(16, 16, 4\).*"
                                       r"num_classes 5, the model's is 10"):
    sampling.check_guide(ok, model, ok, other)
