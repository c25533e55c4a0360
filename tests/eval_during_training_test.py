"""FID of EMA samples during training (jdit.evaluation, config.eval)."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jdit import checkpoint, diffusion, evaluation, sampling, sharding
from jdit import train as train_lib
from jdit import vae as vae_lib
from jdit.metrics import fid as fid_lib
from jdit.metrics import inception, scores

torch = pytest.importorskip("torch")

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from tests.metrics import inception_torch_ref

DIM = evaluation.POOL_FEATURES


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
  """Random FID-Inception weights (pytorch-fid's file format) and a
  reference batch with random, valid statistics."""
  d = tmp_path_factory.mktemp("eval")
  weights = str(d / "pt_inception.pth")
  torch.save(inception_torch_ref.random_fid_inception().state_dict(), weights)
  rng = np.random.RandomState(0)
  a = rng.normal(size=(DIM, 64))
  ref = str(d / "ref.npz")
  np.savez(ref, mu=rng.normal(0, 0.1, DIM), sigma=a @ a.T / 64 + 0.01 *
           np.eye(DIM))
  return {"inception": weights, "ref": ref, "dir": d}


def _with_eval(config, files, **overrides):
  e = config.eval
  e.every, e.num_samples, e.batch_size, e.steps = 2, 12, 8, 2
  e.ref, e.inception = files["ref"], files["inception"]
  for key, value in overrides.items():
    e[key] = value
  return config


def _init(model, shape):
  """Random params, initialised under jit (eagerly, each op compiles)."""
  return jax.jit(lambda k: model.init(
      k, np.zeros((1,) + shape), np.zeros((1,)), np.zeros((1,), np.int32)))(
          jax.random.key(0))["params"]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_fid_is_logged_at_eval_steps_and_matches_fid_evaluate(
    tiny_config, eval_files, tmp_path):
  c = _with_eval(tiny_config, eval_files)
  c.total_steps = 5  # evals at 2, 4 and 5 (the last), checkpoints too
  c.checkpoint_every = 2
  c.log_every = 3
  result = train_lib.run(c, str(tmp_path))
  rows = _rows(tmp_path)
  # An eval step logs the loss too, in the same row.
  assert [r["step"] for r in rows] == [2, 3, 4, 5]
  assert "eval/fid" not in rows[1]
  evals = [rows[0], rows[2], rows[3]]
  for r in evals:
    assert np.isfinite(r["loss"]) and np.isfinite(r["eval/fid"]), r
    assert r["eval/fid"] > 0 and r["eval/inception_score"] >= 1.0
  assert result["eval/fid"] == rows[-1]["eval/fid"]
  assert len({r["eval/fid"] for r in evals}) == 3  # the model changed
  # The lowest FID's EMA params are kept apart, loadable for sampling.
  best = min(evals, key=lambda r: r["eval/fid"])
  best_params, best_config = checkpoint.load_for_sampling(
      str(tmp_path / checkpoint.BEST_SUBDIR))
  kept = checkpoint.BestCheckpoint(str(tmp_path))
  assert kept.fid == best["eval/fid"]
  assert kept.mngr.latest_step() == best["step"]
  assert best_config.model.name == c.model.name
  jax.tree.map(np.testing.assert_array_equal, best_params,
               checkpoint.load_for_sampling(
                   str(tmp_path / "checkpoints" / str(best["step"])))[0])
  # A worse FID leaves it; a better one replaces it, also at an earlier
  # step (a resumed run's).
  assert not kept.offer(9, best["eval/fid"] + 1, best_params, {})
  assert kept.offer(1, best["eval/fid"] / 2, best_params, {})
  assert kept.mngr.latest_step() == 1
  assert checkpoint.BestCheckpoint(str(tmp_path)).fid == best["eval/fid"] / 2

  # Independently: the EMA params of the step-5 checkpoint, sampled on one
  # device (the run used 8), scored by the FID command's evaluate().
  params, config = checkpoint.load_for_sampling(
      str(tmp_path / "checkpoints" / "5"))
  model, objective = sampling.model_from_config(config)
  mesh = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
  sampler = sampling.Sampler(
      model, objective, params, mesh=mesh, steps=2,
      guidance=diffusion.Guidance(scale=c.sample.cfg_scale, null_label=10))
  labels = np.arange(12) % 10  # sample.py's labels: classes in turn
  images = sampling.generate(sampler, labels, seed=c.seed, chunk=8)
  samples = str(tmp_path / "samples.npz")
  np.savez(samples, arr_0=np.repeat(images, 3, axis=-1), arr_1=labels)
  expected = fid_lib.evaluate(
      samples, eval_files["ref"], inception.load_inception(
          eval_files["inception"]), batch_size=5, fid_method="eigh")
  np.testing.assert_allclose(rows[3]["eval/fid"], expected["fid"], rtol=1e-4)
  np.testing.assert_allclose(rows[3]["eval/inception_score"],
                             expected["inception_score"], rtol=1e-4)

  # Resuming with a bad config.eval fails before training and loses nothing.
  c.total_steps = 7
  c.eval.ref = _bad_ref(eval_files, "wrong.npz", mu=np.zeros(DIM),
                        sigma=np.eye(DIM + 1))
  with pytest.raises(ValueError, match="config.eval.ref"):
    train_lib.run(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "5"]
  assert _rows(tmp_path) == rows


def test_eval_samples_depend_only_on_the_seed(tiny_config, eval_files):
  """The same noise at every evaluation: FIDs differ by the model only."""
  c = _with_eval(tiny_config, eval_files)
  model, objective = sampling.model_from_config(c)
  mesh = sharding.create_mesh(c.mesh)
  params = _init(model, (8, 8, 1))
  evaluator = evaluation.Evaluator(c, model, objective, mesh)
  first = evaluator.images(params)
  assert first.shape == (12, 8, 8, 1) and first.std() > 0
  np.testing.assert_array_equal(evaluator.images(params), first)
  # Scoring streams: batches are made as they are consumed, and the metrics
  # of the stream are those of all images at once.
  batches = evaluator.image_batches(params)
  assert next(batches).shape == (8, 8, 8, 1)
  assert next(batches).shape == (4, 8, 8, 1)
  streamed = evaluator.metrics(evaluator.image_batches(params))
  assert streamed == evaluator.metrics([first])
  c.seed = 1
  other = evaluation.Evaluator(c, model, objective, mesh).images(params)
  assert np.abs(other.astype(int) - first.astype(int)).mean() > 10


def test_latent_samples_are_decoded_by_the_vae(tiny_config, eval_files,
                                               tmp_path):
  """Latent models are scored on VAE-decoded RGB images, as sample.py's."""
  scale = 30.0  # the untrained DiT's latents are O(100)
  vae = vae_lib.AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1,
                              norm_num_groups=4, scale_factor=scale,
                              mid_block_attention=False)

  @jax.jit
  def init(key):
    params = vae.init(key, np.zeros((1, 4, 4, 4)), method="decode")["params"]
    # Nonzero biases: GroupNorm would make a zero-bias decoder blind to the
    # latents' scale.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([p + 0.3 * jax.random.normal(k, p.shape)
                           for p, k in zip(leaves, keys)])

  vae_params = init(jax.random.key(1))
  vae_lib.save_vae(str(tmp_path), vae, vae_params)
  c = _with_eval(tiny_config, eval_files, num_samples=8)
  c.model.in_channels, c.model.input_size = 4, 4
  c.vae = ml_collections.ConfigDict({"path": str(tmp_path)})
  model, objective = sampling.model_from_config(c)
  params = _init(model, (4, 4, 4))
  evaluator = evaluation.Evaluator(c, model, objective,
                                   sharding.create_mesh(c.mesh))
  images = evaluator.images(params)
  assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
  plain = sampling.Sampler(model, objective, params, mesh=evaluator.mesh,
                           steps=2, guidance=diffusion.Guidance(
                               scale=c.sample.cfg_scale, null_label=10))
  latents = plain(jax.random.fold_in(jax.random.key(c.seed), 0),
                  np.arange(8) % 10)
  decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z / scale,
                                           method="decode"))(vae_params,
                                                             latents)
  diff = np.abs(images.astype(int) - sampling.to_uint8(decoded).astype(int))
  assert diff.max() <= 1 and images.std() > 10


def _bad_ref(files, name, **arrays):
  path = str(files["dir"] / name)
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("overrides,match", [
    ({"ref": ""}, "config.eval.ref is empty"),
    ({"inception": ""}, "config.eval.inception is empty"),
    ({"ref": "/nonexistent/ref.npz"}, "config.eval.ref=.* does not exist"),
    ({"inception": "/nonexistent/pt_inception.pth"},
     "config.eval.inception=.* does not exist"),
    ({"num_samples": 1}, "config.eval.num_samples must be an integer >= 2"),
    ({"batch_size": 6}, "config.eval.batch_size=6 must be divisible"),
    ({"sampler": "euler"}, "config.eval.sampler"),
    ("small_ref", r"config.eval.ref=.* mu \(64,\), sigma \(64, 64\)"),
    ("images_ref", "config.eval.ref=.* has no mu/sigma"),
    ("bad_weights", "config.eval.inception=.* is not the FID Inception"),
])
def test_bad_eval_config_fails_before_training(tiny_config, eval_files,
                                               tmp_path, overrides, match):
  if overrides == "small_ref":
    overrides = {"ref": _bad_ref(eval_files, "small.npz", mu=np.zeros(64),
                                 sigma=np.eye(64))}
  elif overrides == "images_ref":
    overrides = {"ref": _bad_ref(eval_files, "images.npz",
                                 arr_0=np.zeros((2, 8, 8, 3), np.uint8))}
  elif overrides == "bad_weights":
    path = str(tmp_path / "not_inception.pth")
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    overrides = {"inception": path}
  c = _with_eval(tiny_config, eval_files, **overrides)
  with pytest.raises(ValueError, match=match):
    train_lib.run(c, str(tmp_path / "run"))
  # Raised before any state, data or checkpoint was made.
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("n", [5, 40])
def test_low_rank_fid_equals_the_full_computation(n):
  """Fewer samples than dimensions take the N x N path; more, the full."""
  rng = np.random.RandomState(n)
  d = 32
  features = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  a = rng.normal(size=(d, d))
  ref_mu, ref_sigma = rng.normal(size=d), a @ a.T / d
  mu, sigma = scores.statistics(features)
  full = scores.frechet_distance(mu, sigma, ref_mu, ref_sigma)  # sqrtm
  np.testing.assert_allclose(
      evaluation.frechet_distance_to(features, ref_mu, ref_sigma), full,
      rtol=1e-6)


def test_fd_dinov2_is_scored_with_fid(tiny_config, eval_files, tmp_path):
  """config.eval.dinov2: eval/fd_dinov2 against the reference's
  mu_dinov2/sigma_dinov2, equal to the FID command's FD_DINOv2."""
  from tests.dinov2_test import _torch_model  # pylint: disable=g-import-not-at-top
  from jdit import convert_dinov2  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / "dinov2_tiny.pth")
  torch.save(_torch_model(seed=4).state_dict(), weights)
  c = _with_eval(tiny_config, eval_files, dinov2=weights)
  model, objective = sampling.model_from_config(c)
  mesh = sharding.create_mesh(c.mesh)
  with pytest.raises(ValueError, match="no mu_dinov2/sigma_dinov2 .* "
                                       "--dinov2"):
    evaluation.Evaluator(c, model, objective, mesh)
  rng = np.random.RandomState(1)
  a = rng.normal(size=(128, 16))
  with np.load(eval_files["ref"]) as f:
    c.eval.ref = _bad_ref(eval_files, "with_dinov2.npz", mu=f["mu"],
                          sigma=f["sigma"], mu_dinov2=rng.normal(size=128),
                          sigma_dinov2=a @ a.T / 16)
  evaluator = evaluation.Evaluator(c, model, objective, mesh)
  images = evaluator.images(_init(model, (8, 8, 1)))
  got = evaluator.metrics([images])
  samples = str(tmp_path / "samples.npz")
  np.savez(samples, arr_0=np.repeat(images, 3, axis=-1))
  want = fid_lib.evaluate(
      samples, c.eval.ref, inception.load_inception(eval_files["inception"]),
      batch_size=5, fid_method="eigh",
      dinov2_encoder=convert_dinov2.load_dinov2(weights))["fd_dinov2"]
  np.testing.assert_allclose(got["eval/fd_dinov2"], want, rtol=1e-5)
  assert np.isfinite(got["eval/fid"])
  c.eval.dinov2 = str(tmp_path / "missing.pth")
  with pytest.raises(ValueError, match="config.eval.dinov2=.* does not "
                                       "exist"):
    evaluation.validate_config(c)
