"""`python -m jdit.metrics.fid` on small generated .npz files."""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jdit.metrics import fid, inception, scores

torch = pytest.importorskip("torch")

# pylint: disable-next=g-import-not-at-top,wrong-import-position
import inception_torch_ref
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from jdit import convert_dinov2, dinov2
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from tests.dinov2_test import _torch_model as torch_dinov2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("fid")
  model_t = inception_torch_ref.random_fid_inception(seed=3)
  torch.save(model_t.state_dict(), d / "pt_inception.pth")
  rng = np.random.RandomState(0)
  samples = rng.randint(0, 256, (10, 32, 32, 3)).astype(np.uint8)
  ref = rng.randint(0, 256, (9, 32, 32, 3)).astype(np.uint8)
  np.savez(d / "samples.npz", samples, np.arange(10))  # arr_0, arr_1
  np.savez(d / "ref_images.npz", ref)
  torch.save(torch_dinov2(seed=2).state_dict(), d / "dinov2_tiny.pth")
  return d, samples, ref


def _torch_dinov2_features(path, images):
  """FD_DINOv2's features as EDM2 computes them: torch's antialiased
  bicubic resize to 224, ImageNet normalisation, the class token."""
  model = torch_dinov2()
  model.load_state_dict(torch.load(path, weights_only=True))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
  x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic",
                                      antialias=True) / 255
  mean = torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
  with torch.no_grad():
    return model(((x - mean) / std).float())["cls"].double().numpy()


def _run(capsys, *args):
  # eigh: scipy's sqrtm takes minutes at 2048 dims on a 2-core machine; the
  # sqrtm path is tested in scores_test.py on small matrices. One BLAS
  # thread: threaded eigh slows down ~8x on a busy 2-core CI machine.
  try:
    import threadpoolctl  # pylint: disable=g-import-not-at-top
    limit = threadpoolctl.threadpool_limits(1)
  except ImportError:
    limit = contextlib.nullcontext()
  with limit:
    fid.main(list(args) + ["--fid_method", "eigh"])
  return json.loads(capsys.readouterr().out)


def _record(monkeypatch, fake_fid=None):
  """Records the features extracted and the statistics FID is given."""
  log = {"feats": [], "fid_args": []}
  real_extract = fid.extract
  real_fid = scores.frechet_distance

  def features(batches, extractors, keys=None):
    out = real_extract(batches, extractors, keys)
    log["feats"].append(out)
    return out

  def frechet(*args, **kw):
    log["fid_args"].append(args)
    # Faked for Inception's features only (2048/2023 dims, whose eigh takes
    # seconds); FD_DINOv2's stay real.
    if fake_fid is not None and len(args[0]) >= 2023:
      return fake_fid
    return real_fid(*args, **kw)

  monkeypatch.setattr(fid, "extract", features)
  monkeypatch.setattr(scores, "frechet_distance", frechet)
  return log


def test_cli_matches_library(files, capsys, monkeypatch):
  d, samples, ref = files
  inc = str(d / "pt_inception.pth")
  log = _record(monkeypatch)
  dino = str(d / "dinov2_tiny.pth")
  out = _run(capsys, "--samples", str(d / "samples.npz"), "--ref",
             str(d / "ref_images.npz"), "--inception", inc,
             "--batch_size", "4", "--dinov2", dino)
  assert out["num_samples"] == 10 and out["num_ref"] == 9
  fs, fr = log["feats"]  # one pass each, Inception's and DINOv2's
  ds, dr = fs, fr
  assert fs["pool"].shape == (10, 2048) and fs["spatial"].shape == (10, 2023)
  assert fr["pool"].shape == (9, 2048)
  # FD_DINOv2 of the features EDM2's pipeline computes in torch.
  torch_ds, torch_dr = (_torch_dinov2_features(dino, x)
                        for x in (samples, ref))
  # The class token of random weights varies little between images (std
  # ~0.01 against values ~1): compare the deviations from the mean.
  for got, want in ((ds["dinov2"], torch_ds), (dr["dinov2"], torch_dr)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got - got.mean(0), want - want.mean(0),
                               rtol=0, atol=1e-5)
  assert out["fd_dinov2"] == pytest.approx(scores.frechet_distance(
      *scores.statistics(torch_ds), *scores.statistics(torch_dr),
      method="eigh"), rel=1e-3)
  # FID and sFID were given the statistics of these features.
  for got, want in zip(log["fid_args"][:2],
                       [scores.statistics(fs["pool"]) +
                        scores.statistics(fr["pool"]),
                        scores.statistics(fs["spatial"]) +
                        scores.statistics(fr["spatial"])]):
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  assert out["inception_score"] == pytest.approx(
      scores.inception_score(fs["logits"], 10), rel=1e-6)
  assert (out["precision"], out["recall"]) == scores.precision_recall(
      fr["pool"], fs["pool"])
  assert out["fid"] > 0 and out["sfid"] > 0
  # Features are those of the library's batched extractor, also of a
  # batch it pads (3 images in a batch of 4, the CLI's compiled shape).
  params = inception.load_inception(inc)
  again = fid.InceptionFeatures(params, batch_size=4)([samples[:3]])
  np.testing.assert_allclose(again["pool"], fs["pool"][:3], rtol=1e-5,
                             atol=1e-5)

  # An ADM-style reference with precomputed statistics only: they are used
  # as given; no precision/recall without reference images.
  rng = np.random.RandomState(1)
  stats = {"mu": rng.normal(size=2048), "sigma": np.eye(2048),
           "mu_s": rng.normal(size=2023), "sigma_s": np.eye(2023)}
  np.savez(d / "ref_stats.npz", **stats)
  log = _record(monkeypatch, fake_fid=1.5)
  out2 = fid.evaluate(str(d / "samples.npz"), str(d / "ref_stats.npz"),
                      params, batch_size=4)
  (_, _, mu, sigma), (_, _, mu_s, sigma_s) = log["fid_args"]
  np.testing.assert_array_equal(mu, stats["mu"])
  np.testing.assert_array_equal(sigma_s, stats["sigma_s"])
  assert out2["fid"] == out2["sfid"] == 1.5
  assert out2["precision"] is None and out2["num_ref"] is None
  # --write_ref: the reference-batch format, with the same statistics.
  fid.main(["--samples", str(d / "ref_images.npz"), "--write_ref",
            str(d / "ref_written.npz"), "--inception", inc,
            "--batch_size", "4", "--dinov2", dino])
  assert json.loads(capsys.readouterr().out)["num_images"] == 9
  with np.load(d / "ref_written.npz") as f:
    np.testing.assert_array_equal(f["arr_0"], ref)
    np.testing.assert_allclose(f["mu"], scores.statistics(fr["pool"])[0],
                               rtol=1e-6, atol=1e-7)
    assert f["sigma_s"].shape == (2023, 2023)
    np.testing.assert_allclose(f["mu_dinov2"], torch_dr.mean(0), rtol=1e-4,
                               atol=1e-4)
    dino_stats = {k: f[k] for k in ("mu_dinov2", "sigma_dinov2")}
  # A reference of statistics only serves FD_DINOv2 as its images did.
  monkeypatch.undo()
  _record(monkeypatch, fake_fid=1.5)
  np.savez(d / "ref_dino_stats.npz", **stats, **dino_stats)
  encoder = convert_dinov2.load_dinov2(dino)
  got = fid.evaluate(str(d / "samples.npz"), str(d / "ref_dino_stats.npz"),
                     params, batch_size=4, fid_method="eigh",
                     dinov2_encoder=encoder)["fd_dinov2"]
  assert got == pytest.approx(out["fd_dinov2"], rel=1e-4)
  with pytest.raises(ValueError, match="neither mu_dinov2/sigma_dinov2 nor "
                                       "images"):
    fid.evaluate(str(d / "samples.npz"), str(d / "ref_stats.npz"), params,
                 batch_size=4, dinov2_encoder=encoder)
  np.savez(d / "ref_bad.npz", mu=stats["mu"][:10], sigma=np.eye(10))
  with pytest.raises(ValueError, match="expected .2048,."):
    fid.evaluate(str(d / "samples.npz"), str(d / "ref_bad.npz"), params,
                 batch_size=4)


@pytest.mark.parametrize("arrays,message", [
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "has no 'arr_0'"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "dtype float32"),
    ({"arr_0": np.zeros((2, 8, 8), np.uint8)}, r"shape \(2, 8, 8\)"),
    ({"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, "expected .N, H, W, 3."),
])
def test_bad_samples(files, tmp_path, arrays, message):
  d, _, _ = files
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=message):
    fid.ImageBatchReader(str(path))
  if message == "has no 'arr_0'":  # once through the real entry point
    proc = subprocess.run(
        [sys.executable, "-m", "jdit.metrics.fid", "--samples", str(path),
         "--ref", str(d / "ref_images.npz"), "--inception",
         str(d / "pt_inception.pth")], capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1 and "has no 'arr_0'" in proc.stderr


def test_streaming_reader_batches(tmp_path):
  imgs = np.random.RandomState(0).randint(0, 256, (7, 5, 4, 3)).astype(
      np.uint8)
  np.savez_compressed(tmp_path / "c.npz", imgs)
  reader = fid.ImageBatchReader(str(tmp_path / "c.npz"))
  got = list(reader.batches(3))
  assert [len(b) for b in got] == [3, 3, 1]
  np.testing.assert_array_equal(np.concatenate(got), imgs)
