"""DiT model zoo: parameter counts, shapes, adaLN-Zero init, bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit.models import build_model
from jdit.models.embed import sincos_2d

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
         "XL": (28, 1152, 16)}


def expected_params(depth, d, p, c=4, classes=1000, freq=256):
  """Trainable parameters of DiT, counted from the paper's architecture."""
  out = 2 * c
  per_block = (d * 6 * d + 6 * d          # adaLN modulation
               + d * 3 * d + 3 * d        # qkv
               + d * d + d                # attention out
               + d * 4 * d + 4 * d        # mlp fc1
               + 4 * d * d + d)           # mlp fc2
  return (p * p * c * d + d               # patch embedding
          + freq * d + d + d * d + d      # timestep MLP
          + (classes + 1) * d             # label table with the null class
          + depth * per_block
          + d * 2 * d + 2 * d             # final adaLN
          + d * p * p * out + p * p * out)  # final linear


def count(model, input_size=32):
  x = jnp.zeros((1, input_size, input_size, 4))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)),
                          jnp.zeros((1,), jnp.int32))
  return sum(l.size for l in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_parameter_counts_match_the_architecture(size, patch):
  depth, d, _ = SIZES[size]
  assert count(build_model(f"DiT-{size}/{patch}")) == expected_params(
      depth, d, patch)


# The DiT paper's Table 1 (millions); the official code counts the fixed
# sin-cos position table (tokens x width) as a parameter, so we add it.
PAPER_MILLIONS = {"S/2": 33.0, "B/2": 130.5, "L/2": 458.1, "XL/2": 675.1}


@pytest.mark.parametrize("variant", PAPER_MILLIONS)
def test_parameter_counts_match_the_paper(variant):
  model = build_model(f"DiT-{variant}")
  tokens = (32 // model.patch_size) ** 2
  total = count(model) + tokens * model.hidden_size
  assert round(total / 1e6, 1) == PAPER_MILLIONS[variant]
  if variant == "XL/2":
    assert total == 675_129_632  # the count the official train.py prints


def tiny(**kw):
  args = dict(input_size=8, in_channels=3, num_classes=5, depth=2,
              hidden_size=64, num_heads=4)
  args.update(kw)
  return build_model("DiT-S/2", **args)


def init(model, b=3):
  h = model.grid_shape[0] * model.patch_size
  x = jax.random.normal(jax.random.key(1), (b, h, h, model.in_channels))
  t = jnp.linspace(0, 999, b)
  y = jnp.arange(b) % model.num_classes
  params = nn.meta.unbox(model.init(jax.random.key(0), x, t, y)["params"])
  return params, x, t, y


@pytest.mark.parametrize("learn_sigma,patch", [(True, 2), (False, 4),
                                               (True, 1)])
def test_forward_shapes(learn_sigma, patch):
  model = tiny(learn_sigma=learn_sigma, patch_size=patch)
  params, x, t, y = init(model)
  out = model.apply({"params": params}, x, t, y)
  assert out.shape == x.shape[:3] + (3 * (2 if learn_sigma else 1),)
  assert out.dtype == jnp.float32


def test_adaln_zero_init_outputs_exactly_zero():
  model = tiny()
  params, x, t, y = init(model)
  out = model.apply({"params": params}, x, t, y)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  for i in range(2):
    block = params[f"blocks_{i}"]["adaLN_modulation"]
    assert not np.any(block["kernel"]) and not np.any(block["bias"])


def test_unpatchify_inverts_patch_order():
  """Non-zero final layer: each output pixel depends on its own patch only."""
  model = tiny(depth=1, learn_sigma=False)
  params, x, t, y = init(model, b=1)
  params = jax.tree.map(lambda a: a, params)
  lin = params["final_layer"]["linear"]
  lin["bias"] = jnp.arange(lin["bias"].size, dtype=jnp.float32)
  out = model.apply({"params": params}, x, t, y)
  # The bias alone sets the output (kernel is zero): pixel (i, j, c) of every
  # patch gets bias[(i * p + j) * C + c].
  p, c = model.patch_size, model.out_channels
  expect = np.arange(p * p * c).reshape(p, p, c)
  np.testing.assert_array_equal(np.asarray(out[0, :p, :p]), expect)
  np.testing.assert_array_equal(np.asarray(out[0, -p:, -p:]), expect)


def test_label_dropout_uses_null_class():
  model = tiny(class_dropout_prob=0.5)
  params, x, t, y = init(model)
  table = params["y_embedder"]["embedding"]
  assert table.shape[0] == model.num_classes + 1
  params["final_layer"]["linear"]["kernel"] = jnp.ones_like(
      params["final_layer"]["linear"]["kernel"])
  params["final_layer"]["adaLN_modulation"]["kernel"] = jax.random.normal(
      jax.random.key(3), params["final_layer"]["adaLN_modulation"]["kernel"]
      .shape)
  drop = jnp.array([True, False, True])
  dropped = model.apply({"params": params}, x, t, y, train=True,
                        force_drop_ids=drop)
  null = model.apply({"params": params}, x, t,
                     jnp.full_like(y, model.num_classes))
  kept = model.apply({"params": params}, x, t, y)
  np.testing.assert_allclose(dropped[0], null[0], atol=1e-6)
  np.testing.assert_allclose(dropped[1], kept[1], atol=1e-6)
  assert not np.allclose(kept[0], null[0])


def test_sincos_table_layout():
  table = sincos_2d(8, 2, 3)  # rows 2, cols 3, dim 8
  assert table.shape == (6, 8)
  # Token (r, c) = index r * 3 + c: first half encodes the column c.
  np.testing.assert_allclose(table[4, :2], np.sin([1.0, 1.0 / 100]),
                             rtol=1e-6)
  np.testing.assert_allclose(table[4, 4:6], np.sin([1.0, 1.0 / 100]),
                             rtol=1e-6)
  np.testing.assert_allclose(table[3, 4:6], np.sin([1.0, 1.0 / 100]),
                             rtol=1e-6)
  np.testing.assert_allclose(table[3, :2], 0.0)


def test_bf16_compute_keeps_float32_params():
  model = tiny(dtype="bfloat16")
  params, x, t, y = init(model)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  assert model.apply({"params": params}, x, t, y).dtype == jnp.float32


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_gives_the_same_gradients(remat):
  base, other = tiny(), tiny(remat=remat)
  params, x, t, y = init(base)
  params = jax.tree.map(lambda a: a + 0.01, params)  # leave adaLN-Zero
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, t, y) ** 2)
  g1 = jax.jit(jax.grad(loss(base)))(params)  # jitted: faster than eager
  g2 = jax.jit(jax.grad(loss(other)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), g1, g2)


@pytest.mark.parametrize("name,kw,match", [
    ("DiT-Q/2", {}, "unknown model name"),
    ("DiT-S/2", {"colour": 1}, "unknown override"),
    ("DiT-S/2", {"mixer": "nope"}, "unknown mixer"),
    ("DiT-S/2", {"mixer_options": {"window": 3}}, "do not belong"),
    ("DiT-S/2", {"input_size": 33}, "divisible by patch_size"),
    ("DiT-S/2", {"num_heads": 5}, "divisible by num_heads"),
    ("DiT-S/2", {"remat": "some"}, "remat must be one of"),
    ("DiT-S/2", {"dtype": "float8"}, "dtype must be one of"),
    ("DiT-S/2", {"mixer_layers": (12,)}, r"mixer_layers .*depth=12"),
    ("DiT-S/2", {"mixer_layers": (1, 1)}, "mixer_layers must be distinct"),
    ("DiT-S/2", {"mixer_layers": ()}, "mixer_layers must be distinct"),
    ("DiT-XL/2-KVCompress", {"depth": 4}, r"mixer_layers .*depth=4"),
])
def test_bad_input(name, kw, match):
  with pytest.raises(ValueError, match=match):
    build_model(name, **kw)


def test_wrong_input_shape_is_named():
  model = tiny()
  with pytest.raises(ValueError, match="x must have shape"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)),
               jnp.zeros((1,), jnp.int32))
