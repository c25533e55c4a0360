"""LightningDiT + VA-VAE end to end: convert both, sample with sample.py.

PyTorch stand-ins for the released checkpoints come from the parity tests
(tests/convert_lightningdit_test.py, tests/vae_ldm_test.py: an LDM-layout
KL autoencoder with attention at its lowest level, 8 latent channels, f4).
The latent statistics are random, so decoding without undoing them would
give other images. sample.py's images are checked against the PyTorch VAE
decoding latents that jdit's sampler produced, de-standardised here by hand.
"""
import os

import jax
import numpy as np
import pytest

from convert_lightningdit_test import CHANNELS, SIZE, _torch_lightning
from convert_test import TINY, _run
from jdit import checkpoint, convert_cli, diffusion, sampling, sharding, vae
from vae_ldm_test import GROUPS, Z, AutoencoderKL

torch = pytest.importorskip("torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLING = dict(sampler="euler", steps=4)
GUIDANCE = dict(scale=3.0, interval=(0.0, 0.89))  # LightningDiT: t >= 0.11
CHUNK = 8  # sample.py's --batch_size: one chunk on 1 or 8 devices


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  assert Z == CHANNELS
  tmp = tmp_path_factory.mktemp("lightning")
  torch.manual_seed(0)
  vae_t = AutoencoderKL().eval()
  with torch.no_grad():
    for p in vae_t.parameters():
      p.copy_(torch.randn_like(p) * (1.0 / max(1, p[0].numel())) ** 0.5)
  rng = np.random.RandomState(3)
  mean = rng.normal(size=(1, Z, 1, 1)).astype(np.float32)
  std = rng.uniform(0.5, 2.0, (1, Z, 1, 1)).astype(np.float32)
  torch.save({"state_dict": vae_t.state_dict()}, tmp / "vavae.pt")
  torch.save({"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)},
             tmp / "latents_stats.pt")
  convert_cli.main(["vae", "--checkpoint", str(tmp / "vavae.pt"),
                    "--latent_stats", str(tmp / "latents_stats.pt"),
                    "--norm_num_groups", str(GROUPS), "--out",
                    str(tmp / "vae")])
  torch.save({"ema": _torch_lightning("released").state_dict()},
             tmp / "lightningdit.pt")
  convert_cli.main(["dit", "--checkpoint", str(tmp / "lightningdit.pt"),
                    "--model", "LightningDiT-B/1", "--objective", "sit",
                    "--override", f"in_channels={CHANNELS}", *TINY,
                    "--vae", str(tmp / "vae"), "--out", str(tmp / "ckpt")])
  return tmp, vae_t, mean, std


def _latents(ckpt, labels, shift):
  """jdit's sampler without decoding: the latents sample.py decodes.

  One chunk of CHUNK labels (padded), drawn as sampling.generate draws it.
  """
  params, config = checkpoint.load_for_sampling(ckpt)
  config.diffusion.flow.sample_shift = shift
  model, objective = sampling.model_from_config(config)
  sampler = sampling.Sampler(
      model, objective, params, mesh=sharding.create_mesh({"data": -1}),
      guidance=diffusion.Guidance(
          null_label=model.num_classes, **GUIDANCE), **SAMPLING)
  y = np.concatenate([labels, np.zeros(CHUNK - len(labels), labels.dtype)])
  x = sampler(jax.random.fold_in(jax.random.key(0), 0), y)
  return np.asarray(x)[:len(labels)]


def test_sample_py_decodes_through_the_vae_statistics(converted):
  tmp, vae_t, mean, std = converted
  out = tmp / "samples.npz"
  _run(os.path.join(REPO, "sample.py"), "--checkpoint", str(tmp / "ckpt"),
       "--num_samples", "4", "--sampler", SAMPLING["sampler"], "--steps",
       str(SAMPLING["steps"]), "--cfg_scale", str(GUIDANCE["scale"]),
       "--cfg_interval", "0,0.89", "--shift", "3.0", "--batch_size",
       str(CHUNK), "--out", str(out))
  with np.load(out) as f:
    images, labels = f["arr_0"], f["arr_1"]
  assert images.shape == (4, 4 * SIZE, 4 * SIZE, 3) and images.dtype == np.uint8
  x = _latents(str(tmp / "ckpt"), labels, 3.0)
  assert x.shape == (4, SIZE, SIZE, CHANNELS)
  z = x.transpose(0, 3, 1, 2) * std + mean  # scale factor 1.0
  with torch.no_grad():
    ref = vae_t.decode(torch.from_numpy(z.astype(np.float32))).numpy()
  ref = sampling.to_uint8(np.clip(ref.transpose(0, 2, 3, 1), -1, 1))
  assert np.abs(images.astype(int) - ref.astype(int)).max() <= 1
  # The time-grid shift changes the samples (so --shift was applied).
  other = _latents(str(tmp / "ckpt"), labels, 1.0)
  assert np.abs(other - x).max() > 1e-2


def test_shift_is_refused_for_ddpm_checkpoints(tmp_path):
  from convert_test import _torch_dit
  torch.save(_torch_dit().state_dict(), tmp_path / "dit.pt")
  convert_cli.main(["dit", "--checkpoint", str(tmp_path / "dit.pt"),
                    "--model", "DiT-S/2", *TINY, "--out", str(tmp_path / "o")])
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"),
                         "--checkpoint", str(tmp_path / "o"), "--shift", "3"],
                        capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "--shift applies to flow checkpoints" in proc.stderr


def test_dit_conversion_takes_the_vae_statistics(converted, tmp_path, capsys):
  """`convert dit --vae weights --latent_stats` stores the statistics with
  the VAE it copies (as `convert vae` does); without them it says so."""
  tmp = converted[0]
  base = ["dit", "--checkpoint", str(tmp / "lightningdit.pt"), "--model",
          "LightningDiT-B/1", "--objective", "sit", "--override",
          f"in_channels={CHANNELS}", *TINY, "--vae", str(tmp / "vavae.pt")]
  convert_cli.main(base + ["--latent_stats", str(tmp / "latents_stats.pt"),
                           "--out", str(tmp_path / "a")])
  stored, _, scale = vae.load_vae(str(tmp_path / "a" / "vae"))
  np.testing.assert_allclose(stored.latents_mean, converted[2].ravel())
  np.testing.assert_allclose(stored.latents_std, converted[3].ravel())
  assert scale == 1.0
  capsys.readouterr()
  convert_cli.main(base + ["--out", str(tmp_path / "b")])
  assert "no per-channel latent statistics" in capsys.readouterr().err
  # A converted VAE keeps its own statistics; no VAE, no statistics.
  for extra in (["--vae", str(tmp / "vae")], []):
    args = [a for a in base if a not in ("--vae", str(tmp / "vavae.pt"))]
    with pytest.raises(SystemExit):
      convert_cli.main(args + extra + [
          "--latent_stats", str(tmp / "latents_stats.pt"),
          "--out", str(tmp_path / "c")])
    assert "--latent_stats" in capsys.readouterr().err
  assert not (tmp_path / "c").exists()
