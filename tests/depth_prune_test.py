"""TinyFusion-style depth pruning: masks, LoRA, block surgery, the search."""
import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jdit import checkpoint, depth_prune, sampling
from jdit import train as train_lib
from jdit.models import block_hooks, build_model
from tests.conftest import load_config, random_params

TINY = {"depth": 4, "hidden_size": 32, "num_heads": 2}


def _digits_model(**kw):
  return build_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10,
                     **{**TINY, **kw})


def _inputs(seed=0, b=3):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (b, 8, 8, 1)),
          jax.random.uniform(k[1], (b,)) * 999,
          jax.random.randint(k[2], (b,), 0, 10))


def test_mask_options_enumerate_every_choice():
  np.testing.assert_array_equal(depth_prune.mask_options(1, 2),
                                [[1, 0], [0, 1]])
  two_of_four = depth_prune.mask_options(2, 4)
  assert two_of_four.shape == (6, 4)
  assert np.all(two_of_four.sum(1) == 2)
  assert len({tuple(r) for r in two_of_four}) == 6
  assert depth_prune.mask_options(7, 14).shape == (3432, 14)


def test_layer_mask_is_hard_with_softmax_gradients():
  options = depth_prune.mask_options(2, 4)
  gates = jax.random.normal(jax.random.key(0), (3, 6))
  key, tau, scaling = jax.random.key(1), 0.7, 3.0
  mask = depth_prune.layer_mask(gates, options, key, tau, scaling)
  assert mask.shape == (12,)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.asarray(mask).reshape(3, 4).sum(1), 2)
  w = jax.random.normal(jax.random.key(2), (12,))
  got = jax.grad(lambda g: jnp.sum(
      depth_prune.layer_mask(g, options, key, tau, scaling) * w))(gates)

  def soft(g):  # the relaxed choice with the same Gumbel noise
    noise = jax.random.gumbel(key, g.shape)
    p = jax.nn.softmax((g * scaling + noise) / tau, axis=-1)
    return jnp.sum((p @ options).reshape(-1) * w)

  np.testing.assert_allclose(got, jax.grad(soft)(gates), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(np.asarray(got)).max() > 0


def test_gumbel_search_finds_the_cheapest_blocks():
  """Gates trained through sampled masks settle on the cheapest option."""
  options = depth_prune.mask_options(1, 3)
  cost = jnp.asarray([[3.0, 1.0, 2.0], [0.5, 2.0, 1.0], [2.0, 2.0, 0.2]])
  tx = optax.adam(0.05)
  steps = 300

  def loss(gates, i):
    progress = i / (steps - 1)
    mask = depth_prune.layer_mask(
        gates, options, jax.random.fold_in(jax.random.key(0), i),
        4.0 + (0.1 - 4.0) * progress, 1.0)
    return jnp.sum(mask * cost.reshape(-1))

  @jax.jit
  def step(gates, opt, i):
    g = jax.grad(loss)(gates, i)
    upd, opt = tx.update(g, opt)
    return optax.apply_updates(gates, upd), opt

  gates = jnp.zeros((3, 3))
  opt = tx.init(gates)
  for i in range(steps):
    gates, opt = step(gates, opt, i)
  kept, confidence = depth_prune.decision(gates, options, 1.0)
  assert kept == [1, 3, 8]  # the cheapest block of each group
  assert min(confidence) > 0.5


@pytest.mark.parametrize("kept", [[1, 2], [0, 3]])
def test_pruned_model_equals_the_masked_full_model(kept):
  model = _digits_model(class_dropout_prob=0.0)
  params = random_params(model)
  x, t, y = _inputs()
  on = np.isin(np.arange(4), kept)

  def skip_dropped(i, call, x_in):
    return call() if on[i] else x_in

  want = jax.jit(lambda p: block_hooks.apply_with_block_hook(
      model, {"params": p}, skip_dropped, x, t, y))(params)
  small = _digits_model(class_dropout_prob=0.0, depth=len(kept))
  got = jax.jit(small.apply)(
      {"params": depth_prune.prune_blocks(params, kept, 4)}, x, t, y)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  full = jax.jit(model.apply)({"params": params}, x, t, y)
  assert np.abs(np.asarray(full - want)).max() > 1e-3  # the blocks mattered


def test_prune_blocks_rejects_bad_indices():
  params = {f"blocks_{i}": {"w": i} for i in range(4)} | {"final": 0}
  for kept in ([], [2, 1], [1, 1], [0, 4], [-1]):
    with pytest.raises(ValueError, match="kept blocks"):
      depth_prune.prune_blocks(params, kept, 4)
  with pytest.raises(ValueError, match="blocks_4"):
    depth_prune.prune_blocks(params, [0], 6)
  assert depth_prune.prune_blocks(params, [1, 3], 4) == {
      "final": 0, "blocks_0": {"w": 1}, "blocks_1": {"w": 3}}


def test_pruned_config_remaps_per_block_fields():
  c = load_config("default")
  c.model.mixer_layers = (0, 3)
  c.init_from = "somewhere"
  out = depth_prune.pruned_config(c, [0, 2, 3])
  assert out.model.depth == 3
  assert tuple(out.model.mixer_layers) == (0, 2)
  assert out.init_from == ""
  assert c.model.depth == 4  # the input is not changed


def test_lora_updates_every_kernel_by_a_low_rank_product():
  params = {"dense": {"kernel": jnp.ones((6, 5)), "bias": jnp.ones(5)},
            "conv": {"kernel": jnp.ones((2, 2, 3, 4))}}
  lora = depth_prune.lora_init(params, 2, jax.random.key(0))
  assert set(flax.traverse_util.flatten_dict(lora)) == {
      ("conv", "kernel", "a"), ("conv", "kernel", "b"),
      ("dense", "kernel", "a"), ("dense", "kernel", "b")}
  assert lora["conv"]["kernel"]["a"].shape == (12, 2)
  same = depth_prune.with_lora(params, lora, 2.0)  # b starts at zero
  jax.tree.map(np.testing.assert_array_equal, same, params)
  lora = jax.tree.map(lambda a: a + 0.5, lora)
  out = depth_prune.with_lora(params, lora, 2.0)
  a, b = (np.asarray(lora["conv"]["kernel"][k]) for k in "ab")
  np.testing.assert_allclose(out["conv"]["kernel"],
                             1 + 2.0 * (a @ b).reshape(2, 2, 3, 4), rtol=1e-6)
  np.testing.assert_array_equal(out["dense"]["bias"], params["dense"]["bias"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 4-block digits DiT with non-trivial blocks, as a sampling checkpoint."""
  c = load_config("default")
  c.model.update(TINY)
  model, _ = sampling.model_from_config(c)
  params = jax.device_get(random_params(model))
  path = str(tmp_path_factory.mktemp("pretrained") / "ckpt")
  checkpoint.save_for_sampling(path, params, c)
  return path, params


def _search_config(tfds_dir, init_from, **prune):
  c = load_config("tinyfusion")
  c.data.data_dir = tfds_dir
  c.model.update(TINY)
  c.batch_size = 16
  c.total_steps = 4
  c.log_every = 2
  c.checkpoint_every = 2
  c.init_from = init_from
  c.depth_prune.update(prune)
  return c


def test_search_writes_the_pruned_original_weights(tfds_dir, tmp_path,
                                                   pretrained):
  path, params = pretrained
  c = _search_config(tfds_dir, path)
  work = str(tmp_path / "search")
  train_lib.run(c, work, stop_at=2)  # interrupted on 8 devices, then
  assert not os.path.exists(os.path.join(work, depth_prune.PRUNED_SUBDIR))
  c.mesh.data = 1  # resumed on one
  train_lib.run(c, work, devices=jax.devices()[:1])
  with open(os.path.join(work, depth_prune.DECISION_FILE)) as f:
    result = json.load(f)
  kept = result["kept"]
  assert len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3)
  assert all(0.5 <= p <= 1 for p in result["confidence"])
  with open(os.path.join(work, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(0.5 <= r["prune/confidence"] <= 1 for r in rows)
  got, config = checkpoint.load_for_sampling(
      os.path.join(work, depth_prune.PRUNED_SUBDIR))
  assert config.model.depth == 2 and config.depth_prune.keep == 0
  want = depth_prune.prune_blocks(params, kept, 4)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  model, _ = sampling.model_from_config(config)
  out = model.apply({"params": got}, *_inputs(b=2))
  assert out.shape == (2, 8, 8, 2) and np.all(np.isfinite(out))
  # The LoRA search never moves the frozen base weights.
  mngr = checkpoint.manager(os.path.join(work, "checkpoints"), create=False)
  state = mngr.restore(4, args=ocp.args.Composite(
      ema_params=ocp.args.StandardRestore()))["ema_params"]
  # sample.py and init_from refuse the search's own checkpoints.
  with pytest.raises(FileNotFoundError, match="pruned/ directory"):
    checkpoint.load_for_sampling(work)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               state["base"], params)
  assert np.abs(state["lora"]["final_layer"]["linear"]["kernel"]["b"]).max() > 0


@pytest.mark.parametrize("field, value, match", [
    ("keep", 2, "keep must be in"),
    ("group", 3, "must divide the model's depth"),
    ("weights", "some", "weights must be one of"),
    ("tau", (1.0, 0.0), "tau must be"),
])
def test_search_rejects_bad_settings(tfds_dir, tmp_path, pretrained, field,
                                     value, match):
  c = _search_config(tfds_dir, pretrained[0], **{field: value})
  with pytest.raises(ValueError, match=match):
    train_lib.run(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_search_needs_a_checkpoint_and_runs_alone(tfds_dir, tmp_path,
                                                  pretrained):
  c = _search_config(tfds_dir, "")
  with pytest.raises(ValueError, match="config.init_from"):
    train_lib.run(c, str(tmp_path / "a"))
  c = _search_config(tfds_dir, pretrained[0])
  c.eval.every = 2
  with pytest.raises(ValueError, match="config.eval.every"):
    train_lib.run(c, str(tmp_path / "b"))


def test_cli_cuts_given_blocks(pretrained, tmp_path, capsys):
  path, params = pretrained
  out = str(tmp_path / "cut")
  with pytest.raises(ValueError, match="kept blocks"):
    depth_prune.main(["--checkpoint", path, "--keep", "3,1", "--out", out])
  assert not os.path.exists(out)
  depth_prune.main(["--checkpoint", path, "--keep", "0,3", "--out", out])
  assert json.loads(capsys.readouterr().out)["kept"] == [0, 3]
  got, config = checkpoint.load_for_sampling(out)
  assert config.model.depth == 2
  jax.tree.map(np.testing.assert_array_equal, got,
               depth_prune.prune_blocks(params, [0, 3], 4))
