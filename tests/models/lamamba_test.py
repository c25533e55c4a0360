"""LaMamba-Diff: shapes, zero init, gradients, label dropout, sizes, config."""
import importlib.util
import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import models
from jdit import sampling
from jdit import train as train_lib
from jdit.models import lamamba
from jdit.models.flops import paper_gmacs, xla_flops

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                     "lamamba.py")
_spec = importlib.util.spec_from_file_location("lamamba_config", _PATH)
lamamba_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lamamba_config)

# DiT paper, Table 4: params (M) and Gflops (multiply-adds) at 256px.
DIT_PARAMS_M = {"S": 33.0, "B": 130.5, "L": 458.1, "XL": 675.1}
DIT_GMACS = {"S": 6.06, "B": 23.01, "L": 80.71, "XL": 118.64}

# Tiny, non-square, patch 2: a (16, 8) image is an (8, 4) token grid, then
# (4, 2); windows of 2 so odd blocks use the shifted windows.
TINY = dict(input_size=(16, 8), in_channels=3, num_classes=5, patch_size=2,
            embed_dim=16, num_heads=2, depths=(1, 1), num_downsamples=1,
            bottleneck_depth=1, window_size=2)


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, fresh params, inputs and one jitted forward + grad."""
  model = models.build_model("LaMamba-Diff-S", **TINY)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8, 3))
  t, y = jnp.array([3.0, 700.0]), jnp.array([1, 4])
  # An rbg key: the init compiles ~3x faster than with threefry on CPU, and
  # the values of the random weights do not matter here.
  params = jax.jit(model.init)(jax.random.key(1, impl="unsafe_rbg"), x, t, y)
  traces = []

  @jax.jit
  def run(p, x, t, y, drop):
    """Output and d mean(out^2)/d params; one compile serves every test."""
    traces.append(1)  # runs once per trace, not per call

    def loss(p):
      out = model.apply(p, x, t, y, train=True, force_drop_ids=drop)
      return jnp.mean(out ** 2), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return out, grads

  return dict(model=model, params=params, perturbed=_perturbed(params), x=x,
              t=t, y=y, forward=lambda *a: run(*a)[0], run=run, traces=traces)


def _perturbed(params):
  """Random values in every parameter (the zero-initialised ones too)."""
  # numpy draws: no per-shape compiles of jax.random on a busy CPU.
  rng = np.random.default_rng(7)
  return jax.tree.map(
      lambda l: l + 0.05 * jnp.asarray(rng.standard_normal(l.shape),
                                       l.dtype), params)


def test_fresh_model_outputs_zero_with_learned_sigma(tiny):
  model, p = tiny["model"], tiny["params"]
  assert model.grid_shape == (8, 4) and model.stage_grids == ((8, 4), (4, 2))
  assert model.out_channels == 6
  no_drop = jnp.zeros((2,), bool)
  out = tiny["forward"](p, tiny["x"], tiny["t"], tiny["y"], no_drop)
  chex.assert_shape(out, (2, 16, 8, 6))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_unet_layout(tiny):
  p = tiny["params"]["params"]
  # Encoder 1+1 blocks, merge, bottleneck 1, decoder (1+1) + expand + (1+1).
  assert {"down0_block0", "down0_merge", "down1_block0", "mid_block0",
          "up0_block0", "up0_block1", "up1_expand", "up1_block0",
          "up1_block1", "final_layer", "pos_embed"} <= set(p)
  widths = {k: p[k]["mlp"]["fc1"]["kernel"].value.shape[0] for k in p
            if "block" in k}
  assert widths["down0_block0"] == widths["up1_block1"] == 16
  assert widths["down1_block0"] == widths["mid_block0"] == 32
  # Both registered mixers are used, not copies.
  assert {"mamba", "attn"} <= set(p["down0_block0"])


def test_gradients_finite_and_reach_every_block(tiny):
  p = tiny["perturbed"]
  _, grads = tiny["run"](p, tiny["x"], tiny["t"], tiny["y"],
                         jnp.array([False, True]))
  chex.assert_tree_all_finite(grads)
  for name, g in grads["params"].items():
    norm = sum(float(jnp.sum(jnp.abs(l))) for l in jax.tree.leaves(g))
    assert norm > 0, f"no gradient reaches {name}"


def test_label_dropout_and_jit_once(tiny):
  p = tiny["perturbed"]
  x, t, y, fwd = tiny["x"], tiny["t"], tiny["y"], tiny["forward"]
  null = jnp.full_like(y, tiny["model"].num_classes)
  dropped = fwd(p, x, t, y, jnp.ones((2,), bool))
  as_null = fwd(p, x, t, null, jnp.zeros((2,), bool))
  kept = fwd(p, x, t, y, jnp.zeros((2,), bool))
  np.testing.assert_allclose(dropped, as_null, atol=1e-6)
  assert not np.allclose(dropped, kept)
  mixed = fwd(p, x, t, y, jnp.array([True, False]))
  np.testing.assert_allclose(mixed[0], dropped[0], atol=1e-6)
  np.testing.assert_allclose(mixed[1], kept[1], atol=1e-6)
  # The same shapes never retrace (the fixture's first call traced once).
  assert len(tiny["traces"]) == 1


def test_eval_mode_needs_no_rng(tiny):
  model, p = tiny["model"], tiny["perturbed"]
  args = (tiny["x"], tiny["t"], tiny["y"])
  a = jax.eval_shape(model.apply, p, *args)
  chex.assert_shape(a, (2, 16, 8, 6))


@pytest.mark.parametrize("size", sorted(lamamba.SIZES))
def test_registered_sizes_vs_paper(size):
  """Params by eval_shape (no allocation) and forward FLOPs at 256px."""
  name = f"LaMamba-Diff-{size}"
  model = models.build_model(name, input_size=32, in_channels=4)
  spec = (jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.int32))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *spec)
  params_m = sum(math.prod(l.shape) for l in jax.tree.leaves(shapes)) / 1e6
  # The paper's SS2D: four directions (x_proj per direction), a 2D conv and
  # the output LayerNorm in every block's mamba mixer.
  mamba = nn.unbox(shapes)["params"]["down0_block0"]["mamba"]
  assert mamba["x_proj"].shape[0] == 4
  assert {"conv2d", "out_norm"} <= set(mamba) and "conv1d" not in mamba
  gmacs = model.macs() / 1e9
  lib = models.flops(name, 32) / 2e9  # jdit.models.flops: 2 FLOPs per MAC
  paper = paper_gmacs(name, 32)
  print(f"\n{name:<18} params {params_m:7.1f}M (DiT-{size}/2 "
        f"{DIT_PARAMS_M[size]:.1f}M)  GMACs {gmacs:6.2f} (DiT-{size}/2 "
        f"{DIT_GMACS[size]:.2f}; paper {'%.1f' % paper if paper else '-'})")
  assert lib == pytest.approx(gmacs, rel=1e-9)
  # The paper's claim at every size: comparable params, far fewer FLOPs.
  assert params_m == pytest.approx(DIT_PARAMS_M[size], rel=0.06)
  assert gmacs < 0.5 * DIT_GMACS[size]
  if paper is not None:
    # 0.91x: the paper counted a d_state 16 model (see the next test).
    assert gmacs / paper == pytest.approx(0.907, abs=0.01)


def _fvcore_style_gmacs(embed_dim, input_size, state):
  """What fvcore counts on the official LaMamba-Diff-XL layout, in GMACs.

  An independent count of yunxiangfu2001/LaMamba-Diff (model/lamamba.py,
  vmamba.py's SS2D) as the paper measured it with fvcore's flop_count:
  Linear and conv layers and the attention matmuls as multiply-adds, every
  LayerNorm as 5 per element (4 without affine), and the selective scan by
  VMamba's flops_selective_scan_fn: 9 * state + 1 per channel of the four
  stacked directions and token.
  """
  c, side, cond = embed_dim, input_size, 4 * embed_dim
  dims = (c, 2 * c, 4 * c, 4 * c)
  sides = (side, side // 2, side // 4, side // 4)

  def ss2d(length, d):
    inner, rank = 2 * d, math.ceil(d / 16)
    return length * (d * 2 * inner + 9 * inner  # in_proj, 3x3 dwconv
                     + 4 * inner * (rank + 2 * state) + 4 * rank * inner
                     + 4 * inner * (9 * state + 1)  # the scan
                     + 5 * inner + inner * d)  # out_norm, out_proj

  def block(length, d, project):
    window = 4 * length * d * d + 2 * length * 64 * d  # 8x8 windows
    return (ss2d(length, d) + window + 8 * length * d * d
            + 3 * 5 * length * d + 9 * d * d + (cond * d if project else 0))

  total = side * side * c * (4 + 5) + 256 * cond + cond * cond
  for i, (d, s) in enumerate(zip(dims, sides)):
    length = s * s
    total += 2 * block(length, d, d != cond) + 3 * block(length, d, True)
    if i < 2:  # patch merging (LN 4d, Linear) and the decoder's expanding
      coarse, wide = (s // 2) ** 2, dims[i + 1]
      total += coarse * 4 * d * (5 + wide)
      total += coarse * wide * 2 * wide + 5 * length * d
  total += 2 * block(sides[-1] ** 2, dims[-1], False)  # bottleneck
  length = side * side
  total += cond * c + length * c * c + 5 * length * c  # final expand + LN
  total += 2 * c * c + 4 * length * c + length * c * 8  # adaLN, LN, linear
  return total / 1e9


@pytest.mark.parametrize("input_size", [32, 64])
def test_paper_gflops_are_a_d_state_16_count(input_size):
  """Why our XL count is 0.91x the paper's (lamamba.py, the FLOPs note)."""
  model = models.build_model("LaMamba-Diff-XL", input_size=input_size)
  side = input_size
  assert model.stage_grids == ((side, side), (side // 2, side // 2),
                               (side // 4, side // 4), (side // 4, side // 4))
  ours = model.macs() / 1e9
  paper = paper_gmacs("LaMamba-Diff-XL", input_size)
  d_state_1 = _fvcore_style_gmacs(320, input_size, 1)
  d_state_16 = _fvcore_style_gmacs(320, input_size, 16)
  print(f"\nLaMamba-Diff-XL at {8 * input_size}px: ours {ours:.1f} GMACs, "
        f"fvcore-style {d_state_1:.1f} (d_state 1) / {d_state_16:.1f} "
        f"(d_state 16), paper {paper:.1f}")
  # The same model under fvcore's conventions (norms, a 9N + 1 scan).
  assert d_state_1 == pytest.approx(ours, rel=0.015)
  # The paper's figure is the count of a d_state 16 model.
  assert d_state_16 == pytest.approx(paper, rel=0.005)


def _xla_check(name, model):
  """XLA's count of the compiled forward (batch 1) vs the analytic one."""
  xla = xla_flops(name, 32) / 2e9
  print(f"{name:<18} XLA cost analysis GMACs {xla:6.2f}")
  # XLA adds elementwise work and counts the reference scan's loop once.
  assert 0.95 < xla / (model.macs() / 1e9) < 1.2


def test_xl_xla_cost_analysis():
  _xla_check("LaMamba-Diff-XL", models.build_model("LaMamba-Diff-XL"))


@pytest.mark.slow
@pytest.mark.parametrize("size", ["S", "B", "L"])
def test_xla_cost_analysis_other_sizes(size):
  name = f"LaMamba-Diff-{size}"
  _xla_check(name, models.build_model(name))


@pytest.mark.parametrize("overrides, match", [
    (dict(input_size=30), r"divisible by 2\*\*num_downsamples"),
    (dict(input_size=36), "window_size"),
    (dict(num_heads=7), "not divisible by num_heads"),
    (dict(num_downsamples=4), "num_downsamples"),
    (dict(depths=()), "depths"),
    (dict(embed_dim=18, num_heads=2), "divisible by 4"),
    (dict(attn_mixer="nope"), "unknown mixer"),
    (dict(mamba_options={"heads": 2}), "do not belong to mixer 'mamba'"),
    (dict(attn_options={"radius": 2}), "do not belong to mixer 'window'"),
    (dict(remat="sometimes"), "remat"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(depth=3), "unknown override"),
])
def test_bad_configurations(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.build_model("LaMamba-Diff-S", **overrides)


def test_bad_input_shape(tiny):
  model, p = tiny["model"], tiny["params"]
  with pytest.raises(ValueError, match=r"x must have shape \(B, 16, 8, 3\)"):
    jax.eval_shape(model.apply, p, jnp.zeros((2, 8, 16, 3)), tiny["t"],
                   tiny["y"])


def test_local_attention_variant_traces():
  model = models.build_model("LaMamba-Diff-S", attn_mixer="local", **TINY)
  assert model.attn_options_for((8, 4), False) == {"window": 1}
  x = jax.ShapeDtypeStruct((2, 16, 8, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  p = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
  chex.assert_shape(jax.eval_shape(model.apply, p, x, t, y), (2, 16, 8, 6))


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_traces(remat, tiny):
  model = models.build_model("LaMamba-Diff-S", remat=remat, **TINY)

  def loss(p):
    return jnp.mean(model.apply(p, tiny["x"], tiny["t"], tiny["y"]) ** 2)

  grads = jax.eval_shape(jax.grad(loss), tiny["params"])
  assert jax.tree.structure(grads) == jax.tree.structure(tiny["params"])


def test_swin_windows_per_stage():
  model = models.build_model("LaMamba-Diff-XL")
  assert model.attn_options_for((32, 32), False) == {"window": (8, 8),
                                                      "shift": (0, 0)}
  assert model.attn_options_for((32, 32), True) == {"window": (8, 8),
                                                     "shift": (4, 4)}
  # A grid no larger than the window attends globally, unshifted (paper).
  assert model.attn_options_for((8, 8), True) == {"window": (8, 8),
                                                   "shift": (0, 0)}
  assert model.attn_options_for((16, 8), True) == {"window": (8, 8),
                                                    "shift": (4, 0)}


@pytest.mark.parametrize("arg, data, side", [
    ("imagenet256", "imagenet256_latents", 32),
    ("imagenet512,model=LaMamba-Diff-B", "imagenet512_latents", 64)])
def test_imagenet_configs_build(arg, data, side):
  c = lamamba_config.get_config(arg)
  model, _ = sampling.model_from_config(c)
  assert isinstance(model, lamamba.LaMambaDiff)
  assert c.data.name == data and model.grid_shape == (side, side)
  assert c.batch_size == 256 and c.optim.lr == 1e-4 and "vae" in c


@pytest.mark.parametrize("arg", ["nope", "digits,foo=1"])
def test_bad_config_args(arg):
  with pytest.raises(ValueError, match="configs/lamamba.py"):
    lamamba_config.get_config(arg)


def test_digits_config_trains(tfds_dir, tmp_path):
  """The digits config through jdit.train.run: 10 steps, falling loss."""
  c = lamamba_config.get_config()
  c.data.data_dir = tfds_dir
  c.batch_size = 32
  c.total_steps = 10
  c.log_every = 5
  c.checkpoint_every = 10
  c.optim.warmup_steps = 1
  c.sample.per_class = 0
  # One device: the model is what is under test here (sharded training is
  # tested in train_test.py and the mixers' sharding in the mixer tests).
  train_lib.run(c, str(tmp_path), devices=jax.devices()[:1])
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [5, 10]
  losses = [r["loss"] for r in rows]
  print(f"\nLaMamba-Diff digits losses at steps 5/10: {losses}")
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
