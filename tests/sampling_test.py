"""sampling: autoguidance through the Sampler (and which guides are
refused), and sample files that resume where an interrupted run stopped."""
import os

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


class _Counting:
  """A Sampler that counts the chunks it samples."""

  def __init__(self, sampler):
    self.sampler, self.mesh, self.calls = sampler, sampler.mesh, 0

  def __call__(self, key, y):
    self.calls += 1
    return self.sampler(key, y)


def test_an_interrupted_file_resumes_to_the_uninterrupted_one(setup,
                                                              tmp_path):
  model, params, _, _, objective, mesh = setup
  sampler = _Counting(sampling.Sampler(model, objective, params, mesh=mesh,
                                       sampler="euler", steps=2))
  labels = np.arange(20) % CLASSES  # chunks of 8, 8 and 4
  full = sampling.generate(sampler, labels, seed=5, chunk=8)
  out, parts = str(tmp_path / "s.npz"), tmp_path / "s.npz.parts"
  kw = dict(seed=5, chunk=8, identity={"steps": 2}, preview=10)
  sampler.calls = 0
  for expected in (["000000.npy"], ["000000.npy", "000001.npy"]):
    assert sampling.generate_to_file(sampler, labels, out, stop_after=1,
                                     **kw) is None
    assert sorted(os.listdir(parts)) == expected + ["manifest.json"]
    assert not os.path.exists(out)
  head = sampling.generate_to_file(sampler, labels, out, **kw)
  assert sampler.calls == 3  # each chunk once over the three calls
  with np.load(out) as f:
    np.testing.assert_array_equal(f["arr_0"], full)
    np.testing.assert_array_equal(f["arr_1"], labels)
  np.testing.assert_array_equal(head, full[:10])
  assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # the parts are gone


def test_parts_of_another_run_are_refused_and_kept(setup, tmp_path):
  model, params, _, _, objective, mesh = setup
  sampler = sampling.Sampler(model, objective, params, mesh=mesh,
                             sampler="euler", steps=2)
  labels = np.arange(16) % CLASSES
  out = str(tmp_path / "s.npz")
  kw = dict(seed=5, chunk=8, identity={"steps": 2, "cfg_scale": 1.0})
  sampling.generate_to_file(sampler, labels, out, stop_after=1, **kw)
  kept = np.load(tmp_path / "s.npz.parts" / "000000.npy")
  for change, named in [
      (dict(identity={"steps": 3, "cfg_scale": 1.0}), "identity.steps"),
      (dict(seed=6), "seed"),
      (dict(chunk=16), "chunk")]:
    with pytest.raises(ValueError, match=f"another run.*{named}"):
      sampling.generate_to_file(sampler, labels, out, **{**kw, **change})
  with pytest.raises(ValueError, match="labels_sha1"):
    sampling.generate_to_file(sampler, labels[::-1], out, **kw)
  np.testing.assert_array_equal(
      np.load(tmp_path / "s.npz.parts" / "000000.npy"), kept)
  assert not os.path.exists(out)


def test_cfg_needs_a_null_class(setup):
  model = setup[0]
  plain = model.clone(class_dropout_prob=0.0)
  with pytest.raises(ValueError, match="class_dropout_prob=0.*autoguidance"):
    sampling.check_cfg(plain, diffusion.Guidance(2.0, CLASSES))
  sampling.check_cfg(plain, diffusion.Guidance(2.0, CLASSES),
                     guide=(model, None))
  sampling.check_cfg(plain, None)
  sampling.check_cfg(plain, 1.0)
  sampling.check_cfg(model, 2.0)
