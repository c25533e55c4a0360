"""REPA: the projector, its loss, and training with a DINOv2 encoder."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import checkpoint, repa, sampling
from jdit import train as train_lib
from jdit.models import build_model

REPA = {"depth": 1, "dim": 8, "projector_dim": 16}


def test_projector_runs_in_training_only():
  model = build_model("DiT-S/2", depth=2, hidden_size=32, num_heads=2,
                      input_size=8, in_channels=1, num_classes=10, repa=REPA)
  x, t, y = jnp.ones((3, 8, 8, 1)), jnp.full((3,), 5.0), jnp.arange(3)
  params = model.init(jax.random.key(0), x, t, y)["params"]
  assert "repa_projector" in params
  _, state = model.apply({"params": params}, x, t, y, train=True,
                         force_drop_ids=jnp.zeros(3, bool),
                         mutable=["intermediates"])
  (z,) = state["intermediates"]["repa"]
  assert z.shape == (3, 16, 8)  # (B, 4x4 tokens, encoder width)
  _, state = model.apply({"params": params}, x, t, y,
                         mutable=["intermediates"])
  assert "repa" not in state.get("intermediates", {})
  for bad in ({"depth": 3, "dim": 8, "projector_dim": 16}, {"depth": 1}):
    with pytest.raises(ValueError, match="repa must be"):
      build_model("DiT-S/2", depth=2, repa=bad)


def test_cosine_distance():
  rng = np.random.default_rng(0)
  z, target = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  cos = np.sum(z * target, -1) / (np.linalg.norm(z, axis=-1)
                                  * np.linalg.norm(target, axis=-1))
  np.testing.assert_allclose(repa.cosine_distance(z, target),
                             np.mean(1 - cos), rtol=1e-5)
  assert float(repa.cosine_distance(3.0 * target, target)) == pytest.approx(
      0.0, abs=1e-6)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
  """A tiny DINOv2 (tests/dinov2_test.py's: width 128, 2 blocks, a 5x5
  stored grid), saved as torch.hub's weight files are."""
  torch = pytest.importorskip("torch")
  from dinov2_test import _torch_model  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("dino") / "dinov2_tiny.pth"
  torch.save(_torch_model().state_dict(), path)
  return str(path)


def _repa_config(config, encoder_file, weight=0.5):
  config.repa.update(weight=weight, encoder=encoder_file, dim=128, depth=1,
                     projector_dim=16)
  return config


def _losses(workdir, key="loss"):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line)[key] for line in f]


def test_trains_with_repa_and_samples(tiny_config, encoder_file, tmp_path):
  c = _repa_config(tiny_config, encoder_file)
  c.total_steps = 3
  train_lib.run(c, str(tmp_path / "a"))
  repa_losses = _losses(tmp_path / "a", "repa_loss")
  assert all(0 < v <= 2 * 0.5 for v in repa_losses), repa_losses
  # Micro-batches see their own images and targets: the same losses.
  c.optim.grad_accum = 2
  train_lib.run(c, str(tmp_path / "b"))
  np.testing.assert_allclose(_losses(tmp_path / "b"), _losses(tmp_path / "a"),
                             rtol=1e-5)
  # The checkpoint samples without the encoder (the projector is skipped).
  params, config = checkpoint.load_for_sampling(str(tmp_path / "a"))
  model, _ = sampling.model_from_config(config)
  out = model.apply({"params": params}, jnp.zeros((2, 8, 8, 1)),
                    jnp.ones((2,)), jnp.arange(2))
  assert out.shape == (2, 8, 8, 2) and np.all(np.isfinite(out))


def test_bad_repa_config_fails_before_training(tiny_config, encoder_file,
                                               tmp_path):
  c = _repa_config(tiny_config, encoder_file)
  c.repa.dim = 32  # the encoder is 128 wide
  with pytest.raises(ValueError, match=r"config.repa.dim=32 .* 128 wide"):
    train_lib.run(c, str(tmp_path))
  c.repa.update(dim=128, encoder=str(tmp_path / "missing.pth"))
  with pytest.raises(ValueError, match="config.repa.encoder"):
    train_lib.run(c, str(tmp_path))
  c.repa.update(encoder="", weight=0.5)
  with pytest.raises(ValueError, match="needs config.repa.encoder"):
    train_lib.run(c, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
