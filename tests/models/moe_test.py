"""MoE feed-forward: routing semantics, losses, expert parallelism, models."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jdit import sharding
from jdit.models import build_model, moe, moe_routing
from jdit.models.moe_models import DIT_MOE_SIZES, dit_moe_options, param_counts

AXES = ("data", "fsdp", "tensor", "expert")
# One compile per call signature instead of one per eager op.
route = jax.jit(moe.route, static_argnums=(1, 2, 3))


def make_mesh(data=1, fsdp=1, tensor=1, expert=1, explicit=False):
  n = data * fsdp * tensor * expert
  if explicit:  # jax.make_mesh's default axis type
    return jax.make_mesh((data, fsdp, tensor, expert), AXES,
                         devices=jax.devices()[:n])
  return Mesh(np.array(jax.devices()[:n]).reshape(data, fsdp, tensor, expert),
              AXES)


# --- routing and capacity on hand-built logits -------------------------------


def test_capacity_formula():
  assert moe.capacity(16, 8, 2, 1.0) == 4
  assert moe.capacity(256, 16, 2, 1.25) == math.ceil(2 * 256 * 1.25 / 16)
  assert moe.capacity(10, 3, 1, 1.0) == 4              # ceil(10/3)
  assert moe.capacity(4, 2, 2, 8.0) == 4               # never above tokens
  assert moe.capacity(4, 64, 1, 0.01) == 1             # never below 1


def test_route_drops_tokens_past_capacity_in_sequence_order():
  # Tokens 0, 1, 2 all want expert 0, token 3 wants expert 1; capacity 2.
  logits = jnp.array([[[4., 0.], [3., 0.], [2., 0.], [0., 5.]]])
  r = route(logits, top_k=1, cap=moe.capacity(4, 2, 1, 1.0))
  assert r.dispatch.shape == (1, 4, 2, 2)
  np.testing.assert_array_equal(r.kept[0, :, 0], [True, True, False, True])
  np.testing.assert_array_equal(r.dispatch[0, 0], [[1, 0], [0, 0]])
  np.testing.assert_array_equal(r.dispatch[0, 1], [[0, 1], [0, 0]])
  np.testing.assert_array_equal(r.dispatch[0, 2], 0)   # dropped
  np.testing.assert_array_equal(r.dispatch[0, 3], [[0, 0], [1, 0]])
  # Combine weights are the router probabilities of the kept slots.
  probs = jax.nn.softmax(logits, -1)
  np.testing.assert_allclose(r.combine[0].sum((1, 2)),
                             [probs[0, 0, 0], probs[0, 1, 0], 0,
                              probs[0, 3, 1]], rtol=1e-6)


def test_route_first_choices_before_second_choices():
  # First choices: t0->e0, t1->e0, t2->e1. Second: t0->e1, t1->e2, t2->e0.
  logits = jnp.log(jnp.array([[[.6, .3, .1], [.5, .1, .4], [.3, .6, .1]]]))
  cap = moe.capacity(3, 3, 2, 0.5)
  assert cap == 1
  r = route(logits, top_k=2, cap=cap)
  np.testing.assert_array_equal(r.expert_index[0], [[0, 1], [0, 2], [1, 0]])
  # t2's first choice takes e1's only slot before t0's second choice.
  np.testing.assert_array_equal(r.kept[0], [[True, False], [False, True],
                                            [True, False]])
  np.testing.assert_array_equal(r.dispatch[0].sum(0), [[1], [1], [1]])


def test_combine_weights_sum():
  logits = jax.random.normal(jax.random.key(0), (3, 10, 4))
  probs = jax.nn.softmax(logits, -1)
  top2 = jnp.sort(probs, -1)[..., -2:].sum(-1)
  r = route(logits, top_k=2, cap=10)        # no dropping
  assert bool(jnp.all(r.kept))
  np.testing.assert_allclose(r.combine.sum((2, 3)), top2, rtol=1e-6)
  r = route(logits, top_k=2, cap=10, renormalize=True)
  np.testing.assert_allclose(r.combine.sum((2, 3)), 1.0, rtol=1e-6)
  # Each expert slot holds at most one token.
  assert float(r.dispatch.sum(1).max()) == 1.0


def test_training_drops_tokens_sampling_does_not():
  m = moe.MoE(hidden=16, num_experts=4, top_k=2, capacity_factor=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 12, 8))
  params = m.init(jax.random.key(1), x)["params"]
  dropped = lambda train: float(m.apply(
      {"params": params}, x, None, not train,
      mutable=["intermediates"])[1]["intermediates"]["dropped_fraction"][0])
  assert dropped(train=True) >= 0.5       # half the slots the choices need
  assert dropped(train=False) == 0.0      # eval_capacity_factor None: E / k
  out = m.apply({"params": params}, x)    # deterministic by default
  full = moe.MoE(hidden=16, num_experts=4, top_k=2, capacity_factor=2.0)
  np.testing.assert_allclose(out, full.apply({"params": params}, x, None,
                                             False), rtol=1e-6)
  half = moe.MoE(hidden=16, num_experts=4, top_k=2, eval_capacity_factor=0.5)
  assert float(half.apply({"params": params}, x, mutable=["intermediates"])[1][
      "intermediates"]["dropped_fraction"][0]) >= 0.5


# --- auxiliary losses --------------------------------------------------------


def test_balance_loss_is_one_for_uniform_routing():
  e, s = 4, 8
  probs = jnp.full((2, s, e), 1.0 / e)
  index = jnp.tile(jnp.arange(s)[:, None] % e, (2, 1, 1))  # every expert same
  np.testing.assert_allclose(moe.balance_loss(probs, index), 1.0, rtol=1e-6)
  # All tokens on expert 0 with a confident router: the maximum, E.
  skew = jnp.zeros((2, s, e)).at[..., 0].set(1.0)
  np.testing.assert_allclose(
      moe.balance_loss(skew, jnp.zeros((2, s, 1), jnp.int32)), e, rtol=1e-6)


def test_z_loss_formula():
  logits = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(moe.z_loss(jnp.asarray(logits)),
                             np.mean(lse ** 2), rtol=1e-5)


def test_diffusion_prior():
  prior = moe.prior_routes(jnp.array([0.0, 0.01, 1.0]), 8, 2)
  np.testing.assert_allclose(prior[0], [.5, .5, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(prior[1], prior[0])      # nearby t share experts
  np.testing.assert_allclose(prior[2], [0, 0, 0, 0, 0, 0, .5, .5])
  p = jnp.array([[.5, .5, 0, 0], [.25, .25, .25, .25]])
  np.testing.assert_allclose(moe.js_divergence(p, p), 0.0, atol=1e-6)
  assert float(moe.js_divergence(p[:1], p[1:])[0]) > 0


def test_moe_sows_weighted_losses():
  m = moe.MoE(hidden=16, num_experts=4, top_k=2, z_loss_weight=0.5,
              balance_loss_weight=0.25, prior_loss_weight=2.0,
              router_input="tokens+c")
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  c = jax.random.normal(jax.random.key(1), (2, 8))
  t = jnp.array([10.0, 900.0])
  params = jax.jit(m.init)(jax.random.key(2), x, c, t=t)["params"]
  apply = jax.jit(lambda p, t: m.apply({"params": p}, x, c, t=t,
                                       mutable=["aux_loss", "intermediates"]))
  _, state = apply(params, t)
  logits = x @ nn.unbox(params)["router"]["kernel"]  # router_c starts at 0
  aux = state["aux_loss"]
  np.testing.assert_allclose(aux["z_loss"][0], 0.5 * moe.z_loss(logits),
                             rtol=1e-5)
  r = route(logits, 2, moe.capacity(6, 4, 2, 1.25))
  np.testing.assert_allclose(aux["balance_loss"][0], 0.25 * moe.balance_loss(
      r.probs, r.expert_index), rtol=1e-5)
  assert float(aux["prior_loss"][0]) > 0
  chex.assert_shape(state["intermediates"]["expert_load"][0], (4,))
  with pytest.raises(ValueError, match="needs the timesteps t"):
    apply(params, None)


# --- inside a DiT ------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_dit_with_moe_forward_backward_finite(act):
  model = build_model("DiT-S/2", depth=1, hidden_size=32, num_heads=2,
                      input_size=8, in_channels=1, num_classes=10, mlp="moe",
                      mlp_options=dict(num_experts=4, top_k=2,
                                       num_shared_experts=1, expert_act=act,
                                       capacity_factor=1.0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, y = jnp.array([3.0, 500.0]), jnp.array([1, 2])
  params = jax.jit(model.init)(jax.random.key(1), x, t, y)["params"]

  def loss(p):
    out, state = model.apply({"params": p}, x, t, y, mutable=["aux_loss"])
    aux = jax.tree.leaves(state["aux_loss"])
    assert len(aux) == 2            # balance + z
    return jnp.mean(out ** 2) + sum(aux)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  chex.assert_tree_all_finite(grads)
  router = nn.unbox(grads)["blocks_0"]["mlp"]["router"]["kernel"]
  assert float(jnp.abs(router).sum()) > 0   # the aux losses reach the router


def test_prior_loss_inside_dit_gets_timesteps():
  model = build_model("DiT-S/2", depth=1, hidden_size=16, num_heads=2,
                      input_size=4, in_channels=1, num_classes=3, mlp="moe",
                      remat="full",
                      mlp_options=dict(num_experts=4, top_k=1,
                                       prior_loss_weight=1.0,
                                       router_input="tokens+c"))
  x = jnp.ones((2, 4, 4, 1))
  y = jnp.array([0, 1])

  @jax.jit
  def prior_loss(t):
    params = model.init(jax.random.key(0), x, t, y)["params"]
    _, state = model.apply({"params": params}, x, t, y, mutable=["aux_loss"])
    return state["aux_loss"]["blocks_0"]["mlp"]["prior_loss"][0]

  early, late = prior_loss(jnp.zeros(2)), prior_loss(jnp.full((2,), 999.0))
  assert float(early) > 0 and float(late) > 0
  assert abs(float(early) - float(late)) > 1e-4   # the prior depends on t


# --- expert parallelism ------------------------------------------------------


def _moe_loss(m, c):
  def loss(params, x):  # training routing: with capacity, tokens drop
    y, state = m.apply({"params": params}, x, c, False, mutable=["aux_loss"])
    return jnp.sum(y * jnp.cos(y)) + sum(jax.tree.leaves(state)), (y, state)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("act,mesh_kw", [
    ("gelu", dict(data=2, expert=4)),
    ("gelu", dict(expert=8)),
    ("swiglu", dict(fsdp=2, tensor=2, expert=2)),
    ("gelu", dict(data=2, expert=4, explicit=True)),
])
def test_expert_parallel_equals_single_device(act, mesh_kw):
  m = moe.MoE(hidden=32, num_experts=8, top_k=2, num_shared_experts=1,
              expert_act=act, capacity_factor=1.0, router_input="tokens+c")
  x = jax.random.normal(jax.random.key(0), (6, 16, 24))   # 6: padded to 8
  c = jax.random.normal(jax.random.key(1), (6, 24))
  params = nn.unbox(jax.jit(m.init)(jax.random.key(2), x, c)["params"])
  step = _moe_loss(m, c)
  (l0, (y0, s0)), g0 = step(params, x)
  r = route(x @ params["router"]["kernel"], 2, moe.capacity(16, 8, 2, 1))
  assert 0 < float(jnp.mean(r.kept)) < 1     # some tokens are dropped
  mesh = make_mesh(**mesh_kw)
  with sharding.use_mesh(mesh):
    (l1, (y1, s1)), g1 = step(params, x)
  tol = dict(rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(y1, y0, **tol)
  np.testing.assert_allclose(l1, l0, **tol)
  chex.assert_trees_all_close(s1, s0, **tol)
  chex.assert_trees_all_close(g1, g0, **tol)


def test_dit_moe_xl_16_experts_train_step_on_8_devices():
  # DiT-MoE-XL/2 with 16 experts; depth and width cut for CPU runtime.
  width = 64
  model = build_model("DiT-MoE-XL/2-8E2A", depth=2, hidden_size=width,
                      num_heads=4, input_size=8, in_channels=4,
                      mlp_options=dit_moe_options(width, 16))
  mesh = make_mesh(data=2, expert=4)
  rules = sharding.DEFAULT_RULES
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
  t = jnp.linspace(0, 999, 8)
  y = jnp.arange(8) % 1000
  abstract = jax.eval_shape(model.init, jax.random.key(1), x, t, y)["params"]
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract),
                                           mesh, rules)
  init = lambda k: nn.unbox(model.init(k, x, t, y)["params"])
  with sharding.use_mesh(mesh, rules):
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(1))
  kernel = params["blocks_0"]["mlp"]["gate_kernel"]
  assert kernel.shape == (16, width, 4 * width)
  assert kernel.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in kernel.addressable_shards} == {4}
  assert {s.index[0].start for s in kernel.addressable_shards} == {
      0, 4, 8, 12}

  def loss(p):
    out, state = model.apply({"params": p}, x, t, y, mutable=["aux_loss"])
    return jnp.mean((out[..., :4] - x) ** 2) + sum(jax.tree.leaves(state))

  grad_fn = jax.jit(jax.value_and_grad(loss))
  with sharding.use_mesh(mesh, rules):
    value, grads = grad_fn(params)
  assert np.isfinite(float(value))
  chex.assert_tree_all_finite(grads)
  gk = grads["blocks_0"]["mlp"]["gate_kernel"]
  assert gk.sharding.spec[0] == "expert"
  # Same loss without a mesh (one device, no shard_map).
  host = jax.tree.map(np.asarray, params)
  np.testing.assert_allclose(float(value), float(jax.jit(loss)(host)),
                             rtol=1e-5)


# --- named models ------------------------------------------------------------


def test_param_counts_match_paper():
  print(f"\n{'model':22s} {'total':>9s} {'paper':>7s} {'active':>9s} "
        f"{'paper':>7s}")
  for name, (*_, total_paper, active_paper) in DIT_MOE_SIZES.items():
    total, active = param_counts(build_model(name))
    print(f"{name:22s} {total / 1e6:8.1f}M {total_paper / 1e6:6.0f}M "
          f"{active / 1e6:8.1f}M {active_paper / 1e6:6.0f}M")
    # The paper prints two or three significant digits (truncated).
    assert abs(total / total_paper - 1) < 0.02, name
    assert abs(active / active_paper - 1) < 0.03, name


# --- bad inputs --------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(capacity_factor=0.0), "capacity_factor must be > 0, got 0.0"),
    (dict(capacity_factor=-1), "capacity_factor"),
    (dict(eval_capacity_factor=0.0), "eval_capacity_factor must be > 0"),
    (dict(top_k=9), r"top_k must be in \[1, num_experts=8\], got 9"),
    (dict(top_k=0), "top_k"),
    (dict(num_experts=0), "num_experts must be >= 1"),
    (dict(dispatch="ring"), "dispatch must be one of"),
    (dict(expert_act="relu"), "expert_act must be one of"),
    (dict(router_input="c"), "router_input"),
    (dict(balance_loss_weight=-1), "balance_loss_weight"),
])
def test_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    moe.MoE(hidden=8, **kw)


def test_bad_options_in_a_dit_raise_at_build():
  with pytest.raises(ValueError, match="top_k must be in"):
    build_model("DiT-MoE-S/2-8E2A", mlp_options=dict(top_k=10))
  with pytest.raises(ValueError, match="bad mlp_options"):
    build_model("DiT-S/2", mlp="moe", mlp_options=dict(num_expert=4))


def test_experts_not_divisible_by_expert_axis():
  m = moe.MoE(hidden=8, num_experts=6, top_k=2)
  x = jnp.zeros((4, 4, 8))
  with sharding.use_mesh(make_mesh(expert=4)):
    with pytest.raises(ValueError, match="num_experts 6 must be divisible by "
                       "the mesh's 'expert' axis size 4"):
      jax.eval_shape(m.init, jax.random.key(0), x)


def test_shard_map_dispatch_needs_a_mesh():
  m = moe.MoE(hidden=8, num_experts=4, dispatch="shard_map")
  with pytest.raises(ValueError, match="needs a mesh"):
    jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, 4, 8)))


# --- config ------------------------------------------------------------------


def test_configs_build_moe_models():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from jdit import sampling  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                      "dit_moe.py")
  spec = importlib.util.spec_from_file_location("dit_moe_config", path)
  config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config)
  model, _ = sampling.model_from_config(config.get_config())
  assert model.mlp == "moe" and model.input_size == 8
  assert model.mlp_options["num_experts"] == 8
  c = config.get_config("imagenet,model=DiT-MoE-B/2-8E2A")
  model, _ = sampling.model_from_config(c)
  assert (model.hidden_size, model.input_size, model.num_classes) == (
      768, 32, 1000)
  assert c.mesh.expert == -1
  with pytest.raises(ValueError, match="bad option .cifar.; allowed: digits, imagenet"):
    config.get_config("cifar")


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_analytic_flops_match_xla(act):
  """flops() counts activated work (router, k routed experts, shared ones);
  XLA sees that plus the one-hot dispatch and combine einsums, L * E * cap
  * D multiply-adds each per layer, when the capacity holds exactly k * L / E
  tokens per expert (here eval_capacity_factor = 1)."""
  from jdit.models.flops import flops, xla_flops  # pylint: disable=g-import-not-at-top
  e, k, size = 4, 2, 16
  opts = dict(num_experts=e, top_k=k, num_shared_experts=1, expert_act=act,
              eval_capacity_factor=1.0)
  kw = dict(input_size=size, depth=2, mlp="moe", mlp_options=opts)
  model = build_model("DiT-S/2", **kw)
  length, d = (size // 2) ** 2, model.hidden_size
  cap = moe_routing.capacity(length, e, k, 1.0)
  assert cap * e == k * length
  dispatch = 2 * model.depth * 2 * length * e * cap * d
  expected = flops("DiT-S/2", **kw) + dispatch
  xla = xla_flops("DiT-S/2", **kw)
  assert expected * 0.999 <= xla <= expected * 1.02, (expected, xla)
  # Activated: k of the E experts, so more experts at the same k cost the
  # router alone.
  wider = flops("DiT-S/2", **{**kw, "mlp_options": {
      **opts, "num_experts": 2 * e}})
  assert wider - flops("DiT-S/2", **kw) == 2 * model.depth * length * d * e
