"""The "modern DiT" switches (RMSNorm, SwiGLU, qk-norm, RoPE) and LightningDiT.

Checkpoint parity with PyTorch is in tests/convert_lightningdit_test.py.
"""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdit import models
from jdit.models.embed import apply_rotary, rotary_tables
from jdit.models.flops import xla_flops
from jdit.models.mixers import get_mixer
from jdit.models.moe_models import param_counts
from jdit.models.registry import MODELS, smoke_overrides

LIGHTNING = sorted(n for n in MODELS if n.startswith("LightningDiT-"))


@pytest.mark.parametrize("grid", [(3, 5), (2, 3, 4)])
def test_rotary_scores_depend_only_on_relative_position(grid):
  # RoPE's defining property: with the same query and key vector at every
  # token, the rotated scores q_i . k_j depend on p_i - p_j alone.
  head_dim = 24
  cos, sin = rotary_tables(grid, head_dim)
  rng = np.random.RandomState(0)
  length = math.prod(grid)
  q = np.tile(rng.normal(size=(1, 1, 1, head_dim)), (1, length, 1, 1))
  k = np.tile(rng.normal(size=(1, 1, 1, head_dim)), (1, length, 1, 1))
  qr = np.asarray(apply_rotary(jnp.asarray(q, jnp.float32), cos, sin))[0, :, 0]
  kr = np.asarray(apply_rotary(jnp.asarray(k, jnp.float32), cos, sin))[0, :, 0]
  scores = qr @ kr.T
  pos = list(itertools.product(*[range(s) for s in grid]))
  by_offset = {}
  for i, j in itertools.product(range(length), repeat=2):
    off = tuple(a - b for a, b in zip(pos[i], pos[j]))
    by_offset.setdefault(off, []).append(scores[i, j])
  for off, values in by_offset.items():
    np.testing.assert_allclose(values, values[0], rtol=1e-4, atol=1e-4,
                               err_msg=str(off))
  # ... and do depend on it, along every axis.
  for axis in range(len(grid)):
    step = tuple(int(a == axis) for a in range(len(grid)))
    assert abs(by_offset[step][0] - by_offset[(0,) * len(grid)][0]) > 1e-3


def test_rotary_keeps_norms_and_bad_head_dim():
  cos, sin = rotary_tables((4, 4), 16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 3, 16))
  np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(x, cos, sin), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  with pytest.raises(ValueError, match="head_dim divisible by 6.*head_dim=16"):
    rotary_tables((2, 4, 4), 16)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_rope_qk_norm_attention_sharded_matches_unsharded(mesh_shape):
  rules = (("act_batch", "data"), ("act_length", None), ("act_embed", None),
           ("embed", None), ("heads", "tensor"), ("kv", None))
  mixer = get_mixer("attention")(num_heads=4, rope=True, qk_norm="rms")
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 64))
  boxed = mixer.init(jax.random.PRNGKey(1), x, grid_shape=(4, 4))
  params = nn.unbox(boxed)
  assert params["params"]["q_norm"]["scale"].shape == (16,)
  expected = mixer.apply(params, x, grid_shape=(4, 4))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape),
              ("data", "tensor"))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                          rules)
  params = jax.device_put(params, shardings)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  with mesh, nn.logical_axis_rules(rules):
    out = jax.jit(lambda p, x: mixer.apply(p, x, grid_shape=(4, 4)))(params,
                                                                      xs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5,
                             rtol=2e-5)


def test_lightningdit_parameter_counts_match_their_names():
  # XL is DiT-XL's size (675M in the LightningDiT paper); 1p0B and 1p6B
  # are named after their sizes.
  expected = {"LightningDiT-XL/1": 675e6, "LightningDiT-1p0B/1": 1.0e9,
              "LightningDiT-1p6B/1": 1.6e9}
  for name, count in expected.items():
    total, _ = param_counts(models.build_model(name))
    assert total == pytest.approx(count, rel=0.04), name
  # SwiGLU holds as many parameters as DiT's MLP: int(2/3 * 4D) wide.
  assert models.build_model("LightningDiT-XL/1").feedforward().width == 3072
  assert models.build_model("LightningDiT-B/1").feedforward().width == 2048


def test_lightningdit_flops_analytic_matches_xla():
  # Patch 1 on 16x16x32 latents: as many tokens, and FLOPs, as DiT-XL/2.
  assert models.flops("LightningDiT-XL/1") == pytest.approx(
      models.flops("DiT-XL/2"), rel=1e-3)
  kw = dict(depth=2, hidden_size=128, num_heads=4, input_size=8)
  ours = models.flops("LightningDiT-B/1", **kw)
  assert ours == pytest.approx(xla_flops("LightningDiT-B/1", **kw), rel=0.02)


@pytest.mark.parametrize("name", LIGHTNING)
def test_every_size_runs_tiny(name):
  model = models.build_model(name, **smoke_overrides(name), input_size=4,
                             num_classes=10)
  assert (model.norm, model.mlp, model.learn_sigma) == ("rms", "swiglu", False)
  x = jnp.ones((1, 4, 4, 32))
  t, y = jnp.array([0.5]), jnp.array([1])
  params = model.init(jax.random.PRNGKey(0), x, t, y)
  blocks = params["params"]["blocks_0"]
  assert set(blocks["mlp"]) == {"w12", "w3"} and "scale" in blocks["norm1"]
  out = model.apply(params, x, t, y)
  assert out.shape == (1, 4, 4, 32) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("kw,match", [
    (dict(norm="batch"), "norm must be one of"),
    (dict(mixer_options={"qk_norm": "l2"}), "qk_norm must be one of"),
    (dict(mixer_options={"rope": True}, hidden_size=40, num_heads=4),
     "head_dim divisible by 4"),
])
def test_bad_switches_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    model = models.build_model("DiT-S/2", depth=1, input_size=8, **kw)
    x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
