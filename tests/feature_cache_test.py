"""Feature caching: the jitted cache against a plain-Python FORA reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import diffusion, feature_cache, sampling, sharding
from jdit.models import build_model
from jdit.models.registry import smoke_overrides

NUM_CLASSES = 5
B = 2


def _perturbed(params, seed):
  """Init params plus noise: the zero-initialised gates and final layer
  would make every block's update (and the output) exactly zero."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
      for p, k in zip(leaves, keys)])


def _build(name="DiT-S/2", **overrides):
  return build_model(name, **{
      **smoke_overrides(name), "input_size": 8, "in_channels": 4,
      "num_classes": NUM_CLASSES, "learn_sigma": False, **overrides})


def _model(name="DiT-S/2", **overrides):
  model = _build(name, **overrides)
  x = jnp.zeros((1, 8, 8, 4))
  params = jax.jit(model.init)(jax.random.key(0), x, jnp.zeros((1,)),
                               jnp.zeros((1,), jnp.int32))["params"]
  return model, _perturbed(params, 1)


def _reference_network(model, params, cache, num_blocks):
  """FORA written out in Python: evaluation n of a run recomputes block i
  when the schedule says so or the rows have no stored update yet, else
  adds the update stored when it was last computed. ``store`` keys the rows
  ("cond" or "uncond"), which the guided reference evaluates separately."""
  def schedule(n, i):
    lo, hi = cache.blocks or (0, num_blocks)
    return (n < cache.warmup or (n - cache.warmup) % cache.interval == 0
            or not lo <= i < hi)

  def call(x, t, y, n, store):
    index = [0]

    def intercept(next_fun, args, kwargs, context):
      if not getattr(type(context.module), "residual_block", False):
        return next_fun(*args, **kwargs)
      i = index[0]
      index[0] += 1
      if schedule(n, i) or i not in store:
        out = next_fun(*args, **kwargs)
        store[i] = out - args[0]
        return out
      return args[0] + store[i]

    with nn.intercept_methods(intercept):
      return model.apply({"params": params}, x, t, y)

  return call


def test_cached_network_matches_reference_over_evaluations():
  model, params = _model(depth=4)
  cache = feature_cache.FeatureCache(interval=3, warmup=1, blocks=(1, 3))
  net = feature_cache.CachedNetwork(model, params, cache)
  ref = _reference_network(model, params, cache, 4)
  rng = np.random.default_rng(0)
  y = jnp.array([1, 3])
  state = net.init_state(jnp.zeros((B, 8, 8, 4)), jnp.zeros((B,)), y)
  step = jax.jit(net.__call__)
  plain = jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y))
  store = {}
  outs = []
  for n in range(6):
    x = jnp.asarray(rng.standard_normal((B, 8, 8, 4)), jnp.float32)
    t = jnp.full((B,), 900.0 - 100 * n)
    out, state = step(x, t, y, state)
    want = ref(x, t, y, n, store)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    outs.append((out, plain(x, t, y)))
  assert int(state[0]) == 6
  # Evaluations 0, 1 (warmup) and 4 compute everything; 2, 3 and 5 reuse
  # blocks 1 and 2 and so differ from the uncached network.
  for n, (out, plain) in enumerate(outs):
    same = np.allclose(out, plain, rtol=2e-5, atol=2e-5)
    assert same == (n in (0, 1, 4)), n


def _sampler(model, params, objective, cache, guidance, **kw):
  mesh = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
  return sampling.Sampler(model, objective, params, mesh=mesh,
                          guidance=guidance, cache=cache, **kw)


@pytest.mark.parametrize("objective,sampler", [
    ("flow", "heun"), ("ddpm", "ddim"), ("ddpm", "dpm++"), ("flow", "sde")])
def test_every_sampler_carries_the_cache(objective, sampler):
  """Reuse changes the samples of every sampler loop (a loop that dropped
  the state would refresh at every evaluation); interval 1 reuses nothing."""
  model, params = _model(learn_sigma=objective == "ddpm")
  obj = diffusion.create(objective, diffusion.default_config(),
                         learn_sigma=model.learn_sigma)
  guidance = diffusion.Guidance(scale=2.0, null_label=NUM_CLASSES,
                                interval=(0.0, 0.7))
  labels = np.array([0, 4])
  kw = dict(sampler=sampler, steps=4)
  if objective == "ddpm":  # keeps the random network's x0 in [-1, 1]
    kw["clip_denoised"] = True
  key = jax.random.key(3)
  want = _sampler(model, params, obj, None, guidance, **kw)(key, labels)
  got = _sampler(model, params, obj, feature_cache.FeatureCache(2), guidance,
                 **kw)(key, labels)
  assert np.all(np.isfinite(got)) and not np.allclose(got, want, atol=1e-4)
  if sampler == "heun":
    every = _sampler(model, params, obj, feature_cache.FeatureCache(1),
                     guidance, **kw)(key, labels)
    np.testing.assert_array_equal(every, want)


def test_guided_interval_sampling_matches_reference():
  """Euler with CFG on t in [0, 0.6]: the first steps evaluate only the
  conditional rows, so the unconditional rows have no stored updates when
  guidance starts and must be computed then, whatever the schedule says."""
  model, params = _model(depth=2)
  obj = diffusion.create("flow", diffusion.default_config(),
                         learn_sigma=False)
  w, steps = 3.0, 6
  guidance = diffusion.Guidance(scale=w, null_label=NUM_CLASSES,
                                interval=(0.0, 0.6))
  cache = feature_cache.FeatureCache(interval=2)
  labels = np.array([2, 0])
  got = _sampler(model, params, obj, cache, guidance, sampler="euler",
                 steps=steps)(jax.random.key(0), labels)

  noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0),
                            (B, 8, 8, 4))
  ref = _reference_network(model, params, cache, 2)
  stores = {"cond": {}, "uncond": {}}
  ts = obj._time_grid(steps, 1.0, 0.0, 1.0)  # pylint: disable=protected-access
  y, y_null = jnp.asarray(labels), jnp.full((B,), NUM_CLASSES)
  x = noise
  for n, (t, tn) in enumerate(zip(ts[:-1], ts[1:])):
    tm = obj.model_time(jnp.full((B,), t, jnp.float32))
    v = ref(x, tm, y, n, stores["cond"])
    if t <= 0.6:
      # Guided calls evaluate both halves in one batch: a block computed for
      # one half is computed for both.
      if len(stores["uncond"]) < len(stores["cond"]):
        stores["uncond"].clear()
        stores["cond"].clear()
        v = ref(x, tm, y, n, stores["cond"])
      u = ref(x, tm, y_null, n, stores["uncond"])
      v = u + w * (v - u)
    x = x + (tn - t) * v
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


def test_lamamba_blocks_are_cached():
  model = _build("LaMamba-Diff-S")
  params = jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                     jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"])
  net = feature_cache.CachedNetwork(model, params,
                                    feature_cache.FeatureCache(2))
  _, (valid, updates) = net.init_state(
      jnp.zeros((B, 8, 8, 4)), jnp.zeros((B,)), jnp.zeros((B,), jnp.int32))
  blocks = [name for name in params if "_block" in name]  # down0_block0...
  assert len(blocks) > 1 and valid.shape == (B,)
  assert len(updates) == len(blocks)


def test_computed_fraction():
  f = feature_cache.FeatureCache
  assert f(2).computed_fraction(10, 4) == 0.5
  assert f(3, warmup=2).computed_fraction(10, 4) == pytest.approx(
      (2 + 3) / 10)  # evaluations 0, 1 (warmup), 2, 5, 8
  # Blocks outside (1, 3) are always computed: 2 of 4 always, 2 of 4 half.
  assert f(2, blocks=(1, 3)).computed_fraction(10, 4) == 0.75


@pytest.mark.parametrize("kwargs,match", [
    ({"interval": 0}, "interval must be an integer >= 1"),
    ({"interval": 2.5}, "interval must be an integer >= 1"),
    ({"warmup": -1}, "warmup must be an integer >= 0"),
    ({"blocks": (3, 3)}, r"blocks must be \(first, stop\)"),
    ({"blocks": (0, 1, 2)}, r"blocks must be \(first, stop\)"),
])
def test_bad_cache(kwargs, match):
  with pytest.raises(ValueError, match=match):
    feature_cache.FeatureCache(**kwargs)


def test_blocks_beyond_depth():
  model, params = _model(depth=2)
  net = feature_cache.CachedNetwork(
      model, params, feature_cache.FeatureCache(2, blocks=(0, 3)))
  with pytest.raises(ValueError, match="exceed the model's 2 cacheable"):
    net.init_state(jnp.zeros((B, 8, 8, 4)), jnp.zeros((B,)),
                   jnp.zeros((B,), jnp.int32))
