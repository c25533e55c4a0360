"""diffusers' DiTTransformer2DModel (the Hub's facebook/DiT-*) -> jdit.

A tiny DiTTransformer2DModel with random weights (one timestep and label
embedder shared by the blocks, as in the Hub's conversion of DiT's weights),
saved with save_pretrained, converted by `jdit.convert dit`, must give the
diffusers model's output once diffusers uses DiT's timestep frequencies;
`jdit.convert export --format diffusers` must write what from_pretrained
loads back to the same weights and outputs.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from convert_export_test import _saved
from convert_lightningdit_test import _overrides as lightning_overrides
from convert_test import TINY
from jdit import checkpoint, convert, convert_cli, convert_dit_diffusers
from jdit.sampling import model_from_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _diffusers_dit(seed=0):
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=4, attention_head_dim=16, in_channels=4,
      out_channels=8, num_layers=2, sample_size=8, patch_size=2,
      num_embeds_ada_norm=10, norm_eps=1e-6).eval()
  with torch.no_grad():
    for p in model.parameters():  # adaLN-Zero's zeros included
      p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(shared.state_dict())
  return model


def _dit_frequencies(model, shift):
  for block in model.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = shift


def _outputs(model, x, t, y):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def test_hub_layout_converts_to_dits_forward_pass(tmp_path):
  model_t = _diffusers_dit()
  model_t.save_pretrained(tmp_path / "transformer")
  out = tmp_path / "converted"
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "transformer"),
                    "--model", "DiT-S/2", *TINY, "--out", str(out)])
  params, config = checkpoint.load_for_sampling(str(out))
  model, _ = model_from_config(config)
  assert (model.input_size, model.depth, model.learn_sigma) == (8, 2, True)
  rng = np.random.RandomState(0)
  x = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  t = np.array([0.0, 17.0, 999.0], np.float32)
  y = np.array([1, 10, 7])  # 10: the null (CFG) label
  ours = np.asarray(model.apply({"params": params}, *map(jnp.asarray,
                                                         (x, t, y))))
  released = _outputs(model_t, x, t, y)  # diffusers' frequencies (shift 1)
  _dit_frequencies(model_t, 0)
  ref = _outputs(model_t, x, t, y)
  assert np.abs(ref).mean() > 0.1
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  assert np.abs(released - ref).max() > 1e-3  # the difference is real


def test_what_is_not_a_dit_is_refused(tmp_path, capsys):
  sd = _diffusers_dit().state_dict()
  assert convert_dit_diffusers.is_diffusers_dit(sd)
  other = dict(sd)
  key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
  other[key] = other[key] + 1
  with pytest.raises(convert.CheckpointMismatchError,
                     match="block 1's timestep_embedder.linear_1.bias "
                           "differs from block 0's"):
    convert_dit_diffusers.official_state_dict(other, 8)
  extra = dict(sd, **{"transformer_blocks.0.attn2.to_q.weight":
                      torch.zeros(64, 64)})
  with pytest.raises(convert.CheckpointMismatchError,
                     match="keys no DiT has .1.: transformer_blocks.0.attn2"):
    convert_dit_diffusers.official_state_dict(extra, 8)
  # Weights without their config.json need the latent side.
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in sd.items()},
            str(tmp_path / "w.safetensors"))
  with pytest.raises(SystemExit):
    convert_cli.main(["dit", "--checkpoint", str(tmp_path / "w.safetensors"),
                      "--model", "DiT-S/2", *TINY, "--out",
                      str(tmp_path / "o")])
  assert "without the config.json" in capsys.readouterr().err
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "w.safetensors"),
                    "--model", "DiT-S/2", *TINY, "--input_size", "8",
                    "--out", str(tmp_path / "o")])
  assert os.path.isdir(tmp_path / "o")


def test_export_to_diffusers_round_trips(tmp_path, capsys):
  """The Hub layout -> jdit -> `export --format diffusers`: from_pretrained
  loads it, holding the weights and config it started from."""
  model_t = _diffusers_dit(seed=1)
  model_t.save_pretrained(tmp_path / "transformer")
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "transformer"),
                    "--model", "DiT-S/2", *TINY, "--out",
                    str(tmp_path / "jdit")])
  out = tmp_path / "exported"
  convert_cli.main(["export", "--checkpoint", str(tmp_path / "jdit"),
                    "--format", "diffusers", "--out", str(out)])
  assert "downscale_freq_shift=1" in capsys.readouterr().err
  again = diffusers.DiTTransformer2DModel.from_pretrained(out).eval()
  want, got = model_t.state_dict(), again.state_dict()
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key].numpy(), value.numpy(),
                                  err_msg=key)
  for key in ("num_attention_heads", "attention_head_dim", "in_channels",
              "out_channels", "num_layers", "sample_size", "patch_size",
              "num_embeds_ada_norm", "norm_eps", "activation_fn",
              "norm_type"):
    assert again.config[key] == model_t.config[key], key


def test_jdit_trained_dit_runs_in_diffusers(tmp_path, capsys):
  """A jdit DiT without label dropout or learned sigma: diffusers gives its
  outputs (at DiT's timestep frequencies); the null row it needs is 0."""
  directory, params, model = _saved(tmp_path, learn_sigma=False,
                                    class_dropout_prob=0.0)
  out = tmp_path / "exported"
  convert_cli.main(["export", "--checkpoint", directory, "--format",
                    "diffusers", "--out", str(out)])
  model_t = diffusers.DiTTransformer2DModel.from_pretrained(out).eval()
  assert model_t.config.out_channels == 4
  table = model_t.transformer_blocks[1].norm1.emb.class_embedder
  np.testing.assert_array_equal(table.embedding_table.weight[10].detach(), 0)
  _dit_frequencies(model_t, 0)
  rng = np.random.RandomState(2)
  x = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
  t = np.array([0.0, 17.0, 999.0], np.float32)
  y = np.array([1, 9, 7])
  ours = np.asarray(model.apply({"params": params}, *map(jnp.asarray,
                                                         (x, t, y))))
  ref = _outputs(model_t, x, t, y)
  assert np.abs(ref).mean() > 0.05
  # float32 rounding of outputs up to ~50 (random weights of scale 0.3).
  assert np.abs(ours - ref).max() <= 2e-5 * np.abs(ref).max()

  lightning, _, _ = _saved(tmp_path / "lightning", "LightningDiT-B/1",
                           **lightning_overrides("rms_qk_norm"))
  for args, message in [
      (["--checkpoint", lightning, "--out", str(tmp_path / "l")],
       "LightningDiT-B/1 has no diffusers layout"),
      (["--checkpoint", directory, "--out", str(out)], "is not empty")]:
    with pytest.raises(SystemExit):
      convert_cli.main(["export", "--format", "diffusers", *args])
    assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "l")
