"""Learning-to-Cache: schedules in the feature cache, trajectory recording,
the router's training, the CLI and sample.py --cache_router."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import (checkpoint, diffusion, feature_cache, learn_cache, sampling,
                  sharding)
from jdit.diffusion import paths
from jdit.models import build_model
from jdit.models.registry import smoke_overrides
from tests.conftest import FAST_COMPILE, ROOT, load_config, random_params

NUM_CLASSES = 4


def _model(depth=3):
  model = build_model("DiT-S/2", **{
      **smoke_overrides("DiT-S/2"), "depth": depth, "input_size": 8,
      "in_channels": 4, "num_classes": NUM_CLASSES, "learn_sigma": False})
  return model, random_params(model, seed=1, scale=0.2)


def _flow():
  return diffusion.create("flow", None, learn_sigma=False)


def _sample(model, params, objective, fn, *, steps=6, guidance=None, n=3):
  noise = jax.random.normal(jax.random.key(0), (n,) + model.input_shape)
  y = jnp.arange(n) % NUM_CLASSES
  return jax.jit(lambda noise, y: objective.sample(
      fn, noise, None, y=y, sampler="euler", steps=steps,
      guidance=guidance))(noise, y)


def _plain(model, params):
  return lambda x, t, y: model.apply({"params": params}, x, t, y)


def test_a_schedule_table_equals_the_rule_it_writes_out():
  model, params = _model()
  objective = _flow()
  rule = feature_cache.FeatureCache(interval=3, warmup=1, blocks=(0, 2))
  table = tuple(tuple(bool(v) for v in rule.refresh(n, 3)) for n in range(6))
  assert table[2] == (False, False, True) and table[4] == (True,) * 3
  by_table = feature_cache.FeatureCache(schedule=table)
  guided = diffusion.Guidance(scale=2.0, null_label=NUM_CLASSES)
  for guidance in (None, guided):
    a = _sample(model, params, objective,
                feature_cache.CachedNetwork(model, params, rule),
                guidance=guidance)
    b = _sample(model, params, objective,
                feature_cache.CachedNetwork(model, params, by_table),
                guidance=guidance)
    full = _sample(model, params, objective, _plain(model, params),
                   guidance=guidance)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - full).max()) > 1e-4  # the reuse changed it
  everything = feature_cache.FeatureCache(schedule=((True,) * 3,) * 6)
  assert not everything.active and by_table.active
  np.testing.assert_allclose(
      _sample(model, params, objective,
              feature_cache.CachedNetwork(model, params, everything)),
      _sample(model, params, objective, _plain(model, params)), atol=1e-6)


def test_schedule_bad_input():
  with pytest.raises(ValueError, match="replaces interval"):
    feature_cache.FeatureCache(interval=2, schedule=((True,),))
  with pytest.raises(ValueError, match="equal rows"):
    feature_cache.FeatureCache(schedule=((True,), (True, False)))
  with pytest.raises(ValueError, match="non-empty"):
    feature_cache.FeatureCache(schedule=())
  cache = feature_cache.FeatureCache(schedule=((True, False),) * 4)
  with pytest.raises(ValueError, match="2 blocks a row, but the model has 3"):
    cache.check_depth(3)
  model, params = _model()
  with pytest.raises(ValueError, match="4 rows .* make 6"):
    sampling.Sampler(model, _flow(), params, mesh=None, sampler="euler",
                     steps=6, cache=cache)


def test_recorder_sees_every_network_input():
  model, params = _model()
  objective = _flow()
  labels = np.array([0, 3])
  guidance = diffusion.Guidance(scale=2.0, null_label=NUM_CLASSES,
                                interval=(0.0, 0.5))
  rec = learn_cache.record(model, objective, params, labels, seed=0,
                           sampler="euler", steps=4, guidance=guidance,
                           chunk=2)
  assert rec["x"].shape == (4, 4, 8, 8, 4) and rec["y"].tolist() == [0, 3, 4,
                                                                       4]
  # The euler grid 1, 3/4, ..., as the network sees it (flipped for SiT's
  # time convention if the objective says so).
  times = np.linspace(1.0, 0.0, 5)[:-1]
  model_t = np.asarray(objective.model_time(jnp.asarray(times)))
  np.testing.assert_allclose(rec["t"][0], model_t, atol=1e-6)
  # Guidance only for t <= 0.5: the unconditional rows sit out 1 and 3/4.
  assert rec["seen"][:2].all()
  assert rec["seen"][2:].tolist() == [[False, False, True, True]] * 2
  np.testing.assert_array_equal(rec["x"][2:, 2:], rec["x"][:2, 2:])
  # Each recorded input is the euler step from the one before, under the
  # guided velocity (conditional only where guidance is off).
  for n in range(3):
    x, t = rec["x"][:2, n], rec["t"][:2, n]
    cond = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                       jnp.asarray(labels))
    out = cond
    if times[n] <= 0.5:
      uncond = model.apply({"params": params}, jnp.asarray(x),
                           jnp.asarray(t), jnp.full((2,), NUM_CLASSES))
      out = uncond + 2.0 * (cond - uncond)
    v = paths.to_velocity(objective.prediction, objective.prediction_of(out),
                          jnp.asarray(x), times[n], objective.path)
    np.testing.assert_allclose(rec["x"][:2, n + 1],
                               x + (times[n + 1] - times[n]) * v, atol=2e-5)


def test_stale_weights_by_hand():
  # One block; beta at evaluations 0..4. At n = 4 with a window of 3: the
  # cache is from 3 (p 0.5), else from 2 (0.5 * 0.2), else 1 takes the rest.
  beta = jnp.asarray([[0.3], [0.9], [0.2], [0.5], [0.7]])
  w = learn_cache._stale_weights(beta, jnp.asarray([4, 2, 1]), 3)
  np.testing.assert_allclose(w[0, :, 0], [0.5, 0.1, 0.4], atol=1e-6)
  # n = 2: from 1 (0.9), else from 0, which always computes.
  np.testing.assert_allclose(w[1, :, 0], [0.9, 0.1, 0.0], atol=1e-6)
  np.testing.assert_allclose(w[2, :, 0], [1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(
      learn_cache._stale_weights(beta, jnp.asarray([4]), 1)[0, :, 0], [1.0])


def _with_identity_block(model, params, block):
  """adaLN-Zero: zero modulation makes the block's update exactly 0, so
  reusing it is free."""
  params = jax.tree.map(np.array, params)
  for leaf in params[f"blocks_{block}"]["adaLN_modulation"].values():
    leaf[...] = 0
  return params


def test_training_loss_by_hand():
  """The first step's error, recomputed row by row: each row's cache mixes
  that row's own past updates by the stale weights."""
  model, params = _model(depth=2)
  objective = _flow()
  labels = np.arange(4) % NUM_CLASSES
  rec = learn_cache.record(model, objective, params, labels, seed=0,
                           sampler="euler", steps=5, guidance=None, chunk=4)
  window, batch, logit = 2, 4, 0.5
  _, history = learn_cache.train_router(
      model, params, rec, iterations=1, batch_size=batch, lr=0.0,
      sparsity=0.0, seed=7, channels=4, window=window, init_logit=logit)
  # The pairs train_router draws: every (row, n >= 1), all rows seen.
  pairs = np.argwhere(np.ones((4, 5), bool))
  pairs = pairs[pairs[:, 1] >= 1]
  pick = pairs[np.random.default_rng([7, 0]).integers(0, len(pairs), batch)]
  beta = jnp.full((5, 2), jax.nn.sigmoid(logit))
  errs, scales = [], []
  for r, n in pick:
    run = lambda k, mix=None: learn_cache._run_blocks(
        model, params, jnp.asarray(rec["x"][r:r + 1, k]),
        jnp.asarray(rec["t"][r:r + 1, k]), jnp.asarray(rec["y"][r:r + 1]),
        mix)
    w = learn_cache._stale_weights(beta, jnp.asarray([n]), window)[0]
    past = [run(max(n - j, 0))[1] for j in range(1, window + 1)]
    cached = [sum(w[j, i] * past[j][i] for j in range(window))
              for i in range(2)]
    target = run(n)[0]
    out = run(n, (beta[n][None], cached))[0]
    errs.append(float(jnp.sum(jnp.square(out - target))))
    scales.append(float(jnp.sum(jnp.square(target))))
  np.testing.assert_allclose(history[0][0], sum(errs) / sum(scales),
                             rtol=1e-4)


def test_router_learns_to_reuse_what_costs_nothing():
  model, params = _model(depth=3)
  params = _with_identity_block(model, params, 1)
  objective = _flow()
  labels = np.arange(8) % NUM_CLASSES
  rec = learn_cache.record(model, objective, params, labels, seed=0,
                           sampler="euler", steps=6, guidance=None, chunk=8)
  logits, history = learn_cache.train_router(
      model, params, rec, iterations=150, batch_size=8, lr=0.1,
      sparsity=0.02, seed=0, channels=4)
  beta = 1 / (1 + np.exp(-logits))
  print("\nbeta (evaluations x blocks):\n", beta.round(2))
  assert logits.shape == (6, 3)
  assert (beta[1:, 1] < 0.2).all()  # the identity block: always reused
  assert (beta[1:, [0, 2]] > 0.5).mean() > 0.8  # the others mostly computed
  assert history[-1][1] < history[0][1]
  cache = learn_cache.schedule_from_logits(logits, 0.5)
  assert cache.schedule[0] == (True,) * 3 and not any(
      row[1] for row in cache.schedule[1:])
  error = learn_cache.sample_error(model, objective, params, cache, labels,
                                   seed=3, sampler="euler", steps=6,
                                   guidance=None)
  rule = feature_cache.FeatureCache(interval=2)
  interval_error = learn_cache.sample_error(
      model, objective, params, rule, labels, seed=3, sampler="euler",
      steps=6, guidance=None)
  print(f"sample error: learned {error:.2e}, interval 2 {interval_error:.2e}")
  assert error < interval_error


def test_split_over_devices_equals_one_device():
  model, params = _model(depth=2)
  objective = _flow()
  labels = np.arange(8) % NUM_CLASSES
  run = dict(sampler="euler", steps=4, guidance=diffusion.Guidance(
      scale=2.0, null_label=NUM_CLASSES, interval=(0.0, 0.5)))
  mesh = sharding.create_mesh({"data": 4, "fsdp": 2}, jax.devices()[:8])
  one = learn_cache.record(model, objective, params, labels, seed=0, chunk=8,
                           **run)
  split = learn_cache.record(model, objective, params, labels, seed=0,
                             chunk=8, mesh=mesh, **run)
  for k in one:
    np.testing.assert_allclose(split[k], one[k], atol=1e-5, err_msg=k)
  train = dict(iterations=3, batch_size=8, lr=0.1, sparsity=0.02, seed=0,
               channels=4, window=2)
  logits_one, history_one = learn_cache.train_router(model, params, one,
                                                     **train)
  logits, history = learn_cache.train_router(model, params, one, mesh=mesh,
                                             **train)
  np.testing.assert_allclose(logits, logits_one, atol=1e-5)
  np.testing.assert_allclose(history, history_one, rtol=1e-4)
  with pytest.raises(ValueError, match="batch_size must be a multiple of "
                     "the 8 devices"):
    learn_cache.train_router(model, params, one, mesh=mesh,
                             **{**train, "batch_size": 4})


def test_cli_writes_a_router_that_sample_py_uses(tmp_path):
  model, params = _model(depth=2)
  c = load_config("default")
  c.objective = "flow"
  c.model.update(depth=2, hidden_size=32, num_heads=2, input_size=8,
                 in_channels=4, num_classes=NUM_CLASSES, learn_sigma=False)
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_for_sampling(ckpt, params, c)
  out = str(tmp_path / "router.json")
  # Runs on all 8 devices: chunks and batches split 8 ways.
  args = ["--checkpoint", ckpt, "--sampler", "euler", "--steps", "5",
          "--num_samples", "8", "--chunk", "8", "--iterations", "20",
          "--cfg_scale", "1.5", "--out", out]
  with pytest.raises(ValueError, match="--chunk must be a multiple of the 8 "
                     "devices that share each batch, got 4"):
    learn_cache.main(args[:8] + ["--chunk", "4"] + args[10:])
  assert not os.path.exists(out)
  learn_cache.main(args)
  with open(out) as f:
    router = json.load(f)
  assert (router["sampler"], router["steps"], router["evaluations"],
          router["blocks"]) == ("euler", 5, 5, 2)
  assert np.asarray(router["schedule"]).shape == (5, 2)
  assert router["schedule"][0] == [1, 1]
  assert 0 < router["computed_fraction"] <= 1
  assert np.isfinite(router["sample_relative_error"])
  with pytest.raises(FileExistsError, match="exists"):
    learn_cache.main(args)
  with pytest.raises(ValueError, match="learned for sampler 'euler' with 5 "
                     "steps, not 'heun' with 5"):
    learn_cache.load_router(out, "heun", 5)
  with pytest.raises(ValueError, match="--threshold must be in"):
    learn_cache.main(args[:-1] + [str(tmp_path / "b.json"), "--threshold",
                                  "1"])
  # A schedule that reuses something, through sample.py.
  router["schedule"] = [[1, 1]] + [[1, 0]] * 4
  with open(out, "w") as f:
    json.dump(router, f)
  samples = str(tmp_path / "s.npz")
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint", ckpt,
       "--sampler", "euler", "--steps", "5", "--num_samples", "4",
       "--cfg_scale", "1.5", "--cache_router", out, "--out", samples],
      check=True, cwd=ROOT, capture_output=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE})
  assert np.load(samples)["arr_0"].shape == (4, 8, 8, 4)
