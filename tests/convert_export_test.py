"""jdit checkpoints -> the official PyTorch layout (`convert export`).

The exported state dicts are loaded with `load_state_dict(strict=True)` into
the PyTorch models that tests/convert_test.py, convert_moe_test.py and
convert_lightningdit_test.py restate from the official repositories, and
must give jdit's outputs; importing them back must give the params bitwise.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert_lightningdit_test import _overrides as lightning_overrides
from convert_lightningdit_test import _torch_lightning
from convert_moe_test import MOE_OVERRIDES, NAME as MOE_NAME, _torch_dit_moe
from convert_test import SMALL, _torch_dit, _torch_out
from jdit import checkpoint, convert, convert_cli, convert_dit
from jdit.models import build_model
from tests.conftest import random_params

torch = pytest.importorskip("torch")

DIT = dict(SMALL, input_size=8, num_classes=10)
FAMILIES = {  # name -> (jdit name, overrides, PyTorch model, input channels)
    "DiT": ("DiT-S/2", DIT, _torch_dit, 4),
    "DiT-MoE": (MOE_NAME, MOE_OVERRIDES, _torch_dit_moe, 4),
    "LightningDiT": ("LightningDiT-B/1", lightning_overrides("rms_qk_norm"),
                     lambda: _torch_lightning("rms_qk_norm"), 8),
    "LightningDiT-layer-norms": (
        "LightningDiT-B/1", lightning_overrides("layer_norms"),
        lambda: _torch_lightning("layer_norms"), 8),
}


def _params(model, seed=3):
  return jax.tree.map(np.asarray, random_params(model, seed=seed, scale=0.3))


def _inputs(channels):
  rng = np.random.RandomState(1)
  x = rng.normal(size=(3, 8, 8, channels)).astype(np.float32)
  return x, np.array([0.0, 0.3, 999.0], np.float32), np.array([1, 10, 7])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_weights_load_strictly_and_match(family):
  name, overrides, torch_model, channels = FAMILIES[family]
  model = build_model(name, **overrides)
  params = _params(model)
  state_dict = convert_dit.dit_params_to_torch(params, model)
  model_t = torch_model()
  model_t.load_state_dict({k: torch.from_numpy(v)
                           for k, v in state_dict.items()}, strict=True)
  x, t, y = _inputs(channels)
  ours = np.asarray(model.apply({"params": params}, *map(jnp.asarray,
                                                         (x, t, y))))
  ref = _torch_out(model_t, x, t, y)
  assert np.abs(ref).mean() > 0.05  # the random weights reach the output
  # float32 sums of O(10) outputs in two orders: 1e-4 of the largest.
  np.testing.assert_allclose(ours, ref, rtol=1e-4,
                             atol=1e-4 * np.abs(ref).max())
  back = convert.dit_params_from_torch(state_dict, name, **overrides)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_repa_projector_is_written_in_repas_layout():
  overrides = dict(DIT, repa={"depth": 1, "dim": 16, "projector_dim": 32})
  model = build_model("DiT-S/2", **overrides)
  params = _params(model)
  state_dict = convert_dit.dit_params_to_torch(params, model)
  proj = params["repa_projector"]
  for i, shape in enumerate([(32, 64), (32, 32), (16, 32)]):
    key = f"projectors.0.{2 * i}"
    np.testing.assert_array_equal(state_dict[f"{key}.weight"],
                                  proj[f"fc{i + 1}"]["kernel"].T)
    assert state_dict[f"{key}.weight"].shape == shape
    np.testing.assert_array_equal(state_dict[f"{key}.bias"],
                                  proj[f"fc{i + 1}"]["bias"])
  # The importer drops the projector (sampling does not use it).
  back = convert.dit_params_from_torch(state_dict, "DiT-S/2", **DIT)
  del params["repa_projector"]
  jax.tree.map(np.testing.assert_array_equal, back, params)


def _saved(tmp_path, name="DiT-S/2", objective="ddpm", **overrides):
  """A sampling checkpoint of random params, as `convert dit` writes;
  objective "jdit-flow": jdit's default flow (the network sees 1000 t)."""
  overrides = dict(DIT, **overrides)
  model = build_model(name, **overrides)
  params = _params(model)
  config = convert_cli.sampling_config(
      name, model, overrides, None, 0.18215,
      objective="ddpm" if objective == "jdit-flow" else objective)
  if objective == "jdit-flow":
    config.objective = "flow"
  directory = tmp_path / f"ckpt-{objective}-{model.mixer}"
  checkpoint.save_for_sampling(str(directory), params, config)
  return str(directory), params, model


def test_cli_writes_pt_and_safetensors_and_converts_back(tmp_path, capsys):
  import safetensors.numpy
  directory, params, model = _saved(tmp_path, objective="sit")
  expected = convert_dit.dit_params_to_torch(params, model)
  convert_cli.main(["export", "--checkpoint", directory, "--out",
                    str(tmp_path / "out" / "dit.pt")])
  assert "SiT's flow, t = 1 data" in capsys.readouterr().err
  loaded = torch.load(tmp_path / "out" / "dit.pt", weights_only=True)
  assert sorted(loaded) == ["ema"]  # what DiT's find_model and REPA read
  assert sorted(loaded["ema"]) == sorted(expected)
  for key, value in loaded["ema"].items():
    np.testing.assert_array_equal(value.numpy(), expected[key])
  convert_cli.main(["export", "--checkpoint", directory, "--out",
                    str(tmp_path / "dit.safetensors")])
  flat = safetensors.numpy.load_file(str(tmp_path / "dit.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, flat, expected)
  # And back through `convert dit`: the same params and time convention.
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "out" / "dit.pt"),
                    "--model", "DiT-S/2", "--objective", "sit",
                    "--override", "depth=2", "--override", "hidden_size=64",
                    "--override", "num_heads=4", "--num_classes", "10",
                    "--out", str(tmp_path / "back")])
  back, config = checkpoint.load_for_sampling(str(tmp_path / "back"))
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert config.objective == "flow" and config.diffusion.flow.model_time_flip
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_cli_notes_and_errors(tmp_path, capsys):
  directory, _, _ = _saved(tmp_path, objective="ddpm")
  convert_cli.main(["export", "--checkpoint", directory, "--out",
                    str(tmp_path / "ddpm.pt")])
  err = capsys.readouterr().err
  assert "DiT's 1000-step DDPM" in err and "learn_sigma=True" in err
  flow, _, _ = _saved(tmp_path, objective="jdit-flow", learn_sigma=False)
  convert_cli.main(["export", "--checkpoint", flow, "--out",
                    str(tmp_path / "flow.pt")])
  assert "no PyTorch DiT sampler assumes" in capsys.readouterr().err

  local, _, _ = _saved(tmp_path, mixer="local")
  (tmp_path / "taken.pt").write_text("keep me")
  for args, message in [
      (["--checkpoint", directory, "--out", str(tmp_path / "taken.pt")],
       "exists"),
      (["--checkpoint", directory, "--out", str(tmp_path / "dit.bin")],
       "must end in .pt/.pth"),
      (["--checkpoint", local, "--out", str(tmp_path / "local.pt")],
       "mixer='local'"),
      (["--checkpoint", str(tmp_path / "nothing"), "--out",
        str(tmp_path / "x.pt")], "does not exist")]:
    with pytest.raises(SystemExit) as e:
      convert_cli.main(["export", *args])
    assert e.value.code == 1
    assert message in capsys.readouterr().err
  assert (tmp_path / "taken.pt").read_text() == "keep me"
  assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt")) == [
      "ddpm.pt", "flow.pt", "taken.pt"]
