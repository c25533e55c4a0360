"""Masked KD (TinyFusion): hidden-state distillation into a shallower DiT."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import checkpoint, depth_prune, distill, sampling
from jdit import train as train_lib
from jdit.models import build_model
from tests.conftest import load_config, random_params

TINY = {"depth": 4, "hidden_size": 32, "num_heads": 2}


def test_hidden_pairs_end_each_span():
  assert distill.hidden_pairs(14, 28) == [(i, 2 * i + 1) for i in range(14)]
  assert distill.hidden_pairs(4, 4) == [(i, i) for i in range(4)]
  assert distill.hidden_pairs(7, 28) == [(i, 4 * i + 3) for i in range(7)]


def test_masked_mse_leaves_out_massive_activations():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(2, 16, 8)).astype(np.float32)
  s = (t + 0.1 * rng.normal(size=t.shape)).astype(np.float32)
  t[0, 3, 5] = 500.0   # massive in the teacher
  s[1, 7, 2] = -400.0  # massive in the student
  got = distill.masked_mse(jnp.asarray(s), jnp.asarray(t), 4.0)
  keep = np.ones(t.shape, bool)
  keep[0, 3, 5] = keep[1, 7, 2] = False
  np.testing.assert_allclose(got, np.mean(((s - t) ** 2)[keep]), rtol=1e-5)
  np.testing.assert_allclose(distill.masked_mse(s, t, 0.0),
                             np.mean((s - t) ** 2), rtol=1e-5)


def build(depth):
  return build_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10,
                     **{**TINY, "depth": depth})


def _teacher_params(identity_blocks):
  """Random 4-block params; the listed blocks are the identity (their
  adaLN-Zero gates are zero)."""
  params = random_params(build(4))
  for i in identity_blocks:
    params[f"blocks_{i}"]["adaLN_modulation"] = jax.tree.map(
        jnp.zeros_like, params[f"blocks_{i}"]["adaLN_modulation"])
  return params


def test_kd_terms_vanish_for_the_exact_pruned_teacher():
  """Teacher blocks 0 and 2 do nothing, so the student of blocks 1 and 3
  reproduces the teacher's output and its hidden states at blocks 1, 3."""
  teacher_params = _teacher_params(identity_blocks=(0, 2))
  student_params = depth_prune.prune_blocks(teacher_params, [1, 3], 4)
  mask = jax.tree.map(lambda _: True, student_params)
  apply_fn = jax.jit(distill.make_apply_fn(
      build(2), build(4), mask, w_out=1.0, w_attn=0.0, w_hidden=1.0,
      massive_threshold=4.0))
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k[0], (3, 8, 8, 1))
  t = jax.random.uniform(k[1], (3,)) * 999
  y = jax.random.randint(k[2], (3,), 0, 10)
  drop = jnp.zeros((3,), bool)
  out, terms = apply_fn(student_params, teacher_params, x, t, y, drop)
  assert out.shape == (3, 8, 8, 2)
  assert float(terms["distill_out"]) < 1e-10
  assert float(terms["distill_hidden"]) < 1e-10
  moved = jax.tree.map(lambda p: p * 1.1, student_params)
  _, terms = apply_fn(moved, teacher_params, x, t, y, drop)
  assert float(terms["distill_hidden"]) > 1e-4
  assert float(terms["distill_out"]) > 1e-6
  grads = jax.grad(lambda p: apply_fn(p, teacher_params, x, t, y, drop)[1][
      "distill_hidden"])(moved)
  assert np.abs(np.asarray(grads["blocks_0"]["attn"]["qkv"]["kernel"])).max(
  ) > 0


@pytest.fixture(scope="module")
def teacher_and_pruned(tmp_path_factory):
  c = load_config("default")
  c.model.update(TINY)
  root = tmp_path_factory.mktemp("kd")
  teacher = str(root / "teacher")
  checkpoint.save_for_sampling(teacher, jax.device_get(_teacher_params(())),
                               c)
  pruned = str(root / "pruned")
  depth_prune.main(["--checkpoint", teacher, "--keep", "1,3", "--out",
                    pruned])
  return teacher, pruned


def _finetune_config(tfds_dir, teacher, pruned):
  c = load_config("tinyfusion", "finetune")
  c.data.data_dir = tfds_dir
  c.model.update({**TINY, "depth": 2})
  c.batch_size = 16
  c.total_steps = 2
  c.log_every = 1
  c.checkpoint_every = 2
  c.sample.per_class = 0
  c.init_from = pruned
  c.distill.teacher = teacher
  return c


def test_finetune_distills_on_the_dataset(tfds_dir, tmp_path,
                                          teacher_and_pruned):
  teacher, pruned = teacher_and_pruned
  work = str(tmp_path / "ft")
  train_lib.run(_finetune_config(tfds_dir, teacher, pruned), work)
  assert not os.path.exists(os.path.join(work, distill.DATA_FILE))
  with open(os.path.join(work, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["distill_hidden"] > 0 and r["distill_out"] > 0
    np.testing.assert_allclose(
        r["loss"], r["denoise_loss"] + r["distill_out"] + r["distill_hidden"],
        rtol=1e-4)
  params, config = checkpoint.load_for_sampling(work)
  assert config.model.depth == 2
  model, _ = sampling.model_from_config(config)
  assert model.depth == 2 and "blocks_2" not in params


def test_finetune_from_unpruned_weights_is_refused(tfds_dir, tmp_path,
                                                   teacher_and_pruned):
  teacher, _ = teacher_and_pruned
  c = _finetune_config(tfds_dir, teacher, teacher)  # 4 blocks into 2
  with pytest.raises(ValueError, match="unexpected.*blocks_2"):
    train_lib.run(c, str(tmp_path / "bad"))
