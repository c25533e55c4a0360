"""Every config file builds its model and objective; public keys exist."""
import json
import pathlib

import pytest

from jdit import data, sampling
from tests.conftest import load_config

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] /
                                  "configs").glob("*.py"))
# Configs whose get_config needs an argument to pick a variant.
ARGS = {"efficient": "local"}
PUBLIC = ("seed", "batch_size", "total_steps", "log_every", "checkpoint_every",
          "objective", "mesh")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  c = load_config(name, ARGS.get(name))
  for key in PUBLIC:
    assert key in c, f"configs/{name}.py lacks {key}"
  assert "name" in c.model
  model, objective = sampling.model_from_config(c)
  assert objective.name == c.objective
  assert model.learn_sigma == (c.objective == "ddpm") or (
      c.model.get("learn_sigma") is not None)


def test_sit_recipe():
  c = load_config("sit_imagenet256")
  assert (c.objective, c.model.name, c.batch_size) == ("flow", "DiT-XL/2", 256)
  model, objective = sampling.model_from_config(c)
  assert not model.learn_sigma and objective.default_sampler == "sde"
  assert load_config("sit_imagenet256", "path=gvp").diffusion.flow.path == "gvp"
  with pytest.raises(ValueError, match="path must be linear or gvp"):
    load_config("sit_imagenet256", "path=vp")


def test_dit_recipe():
  c = load_config("dit_imagenet256")
  assert (c.model.name, c.model.input_size, c.batch_size, c.optim.lr,
          c.ema_decay, c.total_steps) == ("DiT-XL/2", 32, 256, 1e-4, 0.9999,
                                          7_000_000)


def test_lightningdit_recipe(tmp_path):
  c = load_config("lightningdit_imagenet256")
  model, objective = sampling.model_from_config(c)
  assert c.model.name == "LightningDiT-XL/1" and not model.learn_sigma
  assert model.input_shape == (16, 16, 32)
  assert (c.batch_size, c.optim.lr, c.optim.b2) == (1024, 2e-4, 0.95)
  f = objective.config
  assert (f.time_sampling, f.cosine_loss) == ("logit_normal", 1.0)
  assert objective.sampler_options["euler"]["shift"] == pytest.approx(1 / 0.3)
  # The dataset "latents" takes its shape from the extraction's files.
  (tmp_path / "latent_stats.json").write_text(json.dumps(
      {"latent_shape": [16, 16, 32], "num_classes": 1000,
       "scale_factor": 1.0, "latents_mean": [0.0] * 32,
       "latents_std": [1.0] * 32}))
  spec = data.get_spec(c.data.name, str(tmp_path))
  assert spec.shape == model.input_shape and spec.num_classes == 1000
  small = load_config("lightningdit_imagenet256", "model=LightningDiT-B/1")
  assert small.model.name == "LightningDiT-B/1"
  with pytest.raises(ValueError, match=r"bad option 'res=512'; allowed: "
                     r"model=\.\.\."):
    load_config("lightningdit_imagenet256", "res=512")
