"""The CLEAR conversion test: full-attention teacher -> local-attention student.

A tiny digits DiT is trained for a few steps, then distilled into the same
DiT with the `local` mixer; only the attention layers may change.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jdit import checkpoint, distill
from jdit import train as train_lib
from tests.conftest import load_config

TINY_MODEL = {"depth": 2, "hidden_size": 32, "num_heads": 2}


def _tiny(c, tfds_dir):
  c.data.data_dir = tfds_dir
  c.batch_size = 16
  c.log_every = 1
  c.optim.warmup_steps = 1
  c.sample.per_class = 0
  c.model.update(TINY_MODEL)
  return c


@pytest.fixture(scope="module")
def teacher_dir(tfds_dir, tmp_path_factory):
  """A full-attention digits DiT trained for a few steps."""
  c = _tiny(load_config("default"), tfds_dir)
  c.total_steps = 4
  c.checkpoint_every = 4
  path = str(tmp_path_factory.mktemp("teacher"))
  train_lib.run(c, path)
  return path


def student_config(tfds_dir, teacher):
  c = _tiny(load_config("clear_distill"), tfds_dir)
  c.distill.teacher = teacher
  c.distill.num_samples = 32
  c.distill.steps = 2
  c.total_steps = 20
  c.checkpoint_every = 10
  c.optim.lr = 3e-3
  return c


def raw_params(workdir):
  """The (non-EMA) params of the newest checkpoint in `workdir`."""
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"),
                            create=False)
  out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      params=ocp.args.StandardRestore()))
  return jax.device_get(out["params"])


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_clear_conversion(teacher_dir, tfds_dir, tmp_path, monkeypatch):
  c = student_config(tfds_dir, teacher_dir)
  work = str(tmp_path / "student")
  train_lib.run(c, work, stop_at=10)
  data_file = os.path.join(work, distill.DATA_FILE)
  with np.load(data_file) as f:
    assert f["x"].shape == (32, 8, 8, 1) and f["x"].dtype == np.float32
    assert np.isfinite(f["x"]).all()
    # Balanced labels: 32 samples = 3 per class + classes 0 and 1 again.
    np.testing.assert_array_equal(np.bincount(f["y"]), [4, 4] + [3] * 8)
  stamp = os.stat(data_file).st_mtime_ns

  def no_sampling(*args, **kwargs):
    raise AssertionError("the teacher's samples were generated again")

  monkeypatch.setattr(distill.sampling, "Sampler", no_sampling)
  train_lib.run(c, work)  # resumes at step 10 and reuses the samples
  assert os.stat(data_file).st_mtime_ns == stamp

  rows = metrics(work)
  assert [r["step"] for r in rows] == list(range(1, 21))
  kd = [r["distill_out"] + r["distill_attn"] for r in rows]
  assert np.isfinite(kd).all() and kd[0] > 0
  assert np.mean(kd[-5:]) < 0.8 * np.mean(kd[:5]), kd

  teacher, _ = checkpoint.load_for_sampling(teacher_dir)
  student = raw_params(work)
  flat_t = distill.flatten_params(teacher)
  flat_s = distill.flatten_params(student)
  assert set(flat_t) == set(flat_s)
  changed = []
  for key in flat_t:
    same = np.array_equal(np.asarray(flat_t[key]), np.asarray(flat_s[key]))
    if "/attn/" in key:
      changed.append(not same)
    else:
      assert same, f"{key} is not trainable but changed"
  assert changed and all(changed)  # every qkv/proj kernel and bias moved
  _, config = checkpoint.load_for_sampling(work)
  assert config.model.mixer == "local"

  # Samples made with other settings are refused, not silently reused.
  c.distill.cfg_scale = 3.0
  c.total_steps = 21
  with pytest.raises(ValueError, match="was generated with"):
    train_lib.run(c, work)


def test_missing_teacher_is_named(tfds_dir, tmp_path):
  c = student_config(tfds_dir, str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="config.distill.teacher"):
    train_lib.run(c, str(tmp_path / "w"))


def test_incompatible_init_from_names_the_params(teacher_dir, tfds_dir,
                                                 tmp_path):
  c = student_config(tfds_dir, teacher_dir)
  c.distill.teacher = ""  # plain fine-tuning from init_from
  c.model.hidden_size = 64
  c.init_from = teacher_dir
  with pytest.raises(ValueError, match=r"init_from.*shape mismatches.*"
                     r"blocks_0/attn/qkv/kernel"):
    train_lib.run(c, str(tmp_path / "w"))


def test_trainable_pattern_must_match(teacher_dir, tfds_dir, tmp_path):
  c = student_config(tfds_dir, teacher_dir)
  c.distill.trainable = "no_such_layer"
  with pytest.raises(ValueError, match="matches no parameter"):
    train_lib.run(c, str(tmp_path / "w"))


def test_teacher_and_student_must_agree(teacher_dir, tfds_dir, tmp_path):
  c = student_config(tfds_dir, teacher_dir)
  c.model.depth = 3
  with pytest.raises(ValueError, match="depth=2"):
    train_lib.run(c, str(tmp_path / "w"))


def test_clear_distill_configs():
  c = load_config("clear_distill", "imagenet256")
  assert c.model.name == "DiT-XL/2" and c.model.mixer == "local"
  assert c.model.mixer_options.window == 8
  assert load_config("clear_distill", "window=2").model.mixer_options.window \
      == 2
  with pytest.raises(ValueError, match="bad option"):
    load_config("clear_distill", "radius=3")


def _tiny_dit(**overrides):
  from jdit.models import build_model  # pylint: disable=g-import-not-at-top
  return build_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10,
                     learn_sigma=True, **TINY_MODEL, **overrides)


def test_distillation_terms_and_frozen_gradients():
  """Zero for an identical student; gradients reach only attention params."""
  teacher = _tiny_dit()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t = jnp.array([1.0, 200.0, 500.0, 900.0])
  y = jnp.array([0, 3, 7, 10])
  params = teacher.init(jax.random.key(1), x, t, y)["params"]
  # Random adaLN gates and final layer (zero at init) so attention matters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  drop = jnp.zeros(4, bool)
  mask = distill.trainable_mask(params, "attn")

  same = distill.make_apply_fn(teacher, teacher, mask, 0.5, 0.5)
  _, terms = same(params, params, x, t, y, drop)
  assert terms == {"distill_out": 0.0, "distill_attn": 0.0}

  student = _tiny_dit(mixer="local", mixer_options={"window": 1})
  apply_fn = distill.make_apply_fn(student, teacher, mask, 0.5, 0.5)
  _, terms = apply_fn(params, params, x, t, y, drop)
  assert terms["distill_out"] > 1e-6 and terms["distill_attn"] > 1e-6

  grads = jax.grad(lambda p: sum(apply_fn(p, params, x, t, y, drop)[1]
                                 .values()))(params)
  for key, g in distill.flatten_params(grads).items():
    if "/attn/" in key:
      assert np.abs(g).max() > 0, key
    else:
      assert not np.any(g), key
