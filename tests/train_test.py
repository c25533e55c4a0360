"""End-to-end training: outputs, exact resume, sharding, accumulation, errors."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jdit import checkpoint, sampling, sharding
from jdit import train as train_lib
from jdit import train_state as ts
from tests.conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_train_writes_metrics_checkpoints_and_samples(tiny_config, tmp_path):
  c = tiny_config
  c.sample.per_class = 1
  c.sample.steps = 3
  c.keep_checkpoints = 1
  train_lib.run(c, str(tmp_path))
  rows = losses(tmp_path)
  assert [s for s, _ in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(l) for _, l in rows)
  with open(tmp_path / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  assert {"step", "loss", "lr", "steps_per_sec"} <= set(first)
  assert os.listdir(tmp_path / "tensorboard")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # keep 1
  grid = np.load(tmp_path / "samples_step4.npz")
  assert grid["arr_0"].shape == (10, 8, 8, 1) and grid["arr_0"].dtype == np.uint8
  assert (tmp_path / "samples_step4.png").exists()


def test_interrupted_run_resumes_exactly(tiny_config, tmp_path,
                                        monkeypatch):
  straight, resumed = tmp_path / "a", tmp_path / "b"
  train_lib.run(tiny_config, str(straight))
  train_lib.run(tiny_config, str(resumed), stop_at=3)
  assert [s for s, _ in losses(resumed)] == [1, 2, 3]
  # The checkpoint is at step 3 (the stop); rows after it would be redone.
  train_lib.run(tiny_config, str(resumed))
  assert losses(resumed) == losses(straight)

  # A preemption notice (SIGTERM) during step 1, between the periodic
  # checkpoints: the step finishes, is checkpointed and training returns; the same run again continues as if
  # never stopped. The signal handler is restored afterwards.
  batches, real = [], sharding.global_batch

  def notify_during_step_1(batch, mesh):
    batches.append(1)
    if len(batches) == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(batch, mesh)

  before = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(sharding, "global_batch", notify_during_step_1)
  preempted = tmp_path / "c"
  train_lib.run(tiny_config, str(preempted))
  assert signal.getsignal(signal.SIGTERM) is before
  assert os.listdir(preempted / "checkpoints") == ["1"]
  assert [s for s, _ in losses(preempted)] == [1]
  monkeypatch.undo()
  train_lib.run(tiny_config, str(preempted))
  assert losses(preempted) == losses(straight)


def test_resume_drops_rows_logged_after_the_checkpoint(tiny_config, tmp_path):
  tiny_config.checkpoint_every = 2
  train_lib.run(tiny_config, str(tmp_path), stop_at=3)  # ckpts at 2 and 3
  mngr = checkpoint.manager(str(tmp_path / "checkpoints"))
  mngr.delete(3)  # as if killed after logging step 3 but before saving it
  train_lib.run(tiny_config, str(tmp_path))
  assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]


def test_checkpoint_restores_onto_other_meshes(tiny_config, tmp_path):
  """Saved on 8 devices as (2, 2, 2); resumed on (8, 1, 1) and on 1 device."""
  tiny_config.model.hidden_size = 64
  tiny_config.model.num_heads = 4
  tiny_config.total_steps = 3
  train_lib.run(tiny_config, str(tmp_path / "straight"))
  first = tiny_config.copy_and_resolve_references()
  first.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
  train_lib.run(first, str(tmp_path / "a"), stop_at=2)
  for name, mesh, devices in [("b", {"data": 8}, None),
                              ("c", {"data": 1}, jax.devices()[:1])]:
    os.makedirs(tmp_path / name)
    os.system(f"cp -r {tmp_path / 'a'}/* {tmp_path / name}/")
    again = tiny_config.copy_and_resolve_references()
    again.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    train_lib.run(again, str(tmp_path / name), devices=devices)
    np.testing.assert_allclose([l for _, l in losses(tmp_path / name)],
                               [l for _, l in losses(tmp_path / "straight")],
                               rtol=2e-5)


def _setup(config, mesh_sizes):
  model, objective = sampling.model_from_config(config)
  mesh = sharding.create_mesh(mesh_sizes)
  rules = sharding.DEFAULT_RULES
  tx, _ = ts.make_optimizer(config.optim, config.total_steps)
  state = ts.create_state(model, tx, mesh, rules, config.seed)
  return model, objective, mesh, rules, tx, state


def _batch(n=16):
  rng = np.random.default_rng(0)
  return {"x": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "y": rng.integers(0, 10, n).astype(np.int32)}


def _steps(config, mesh_sizes, accum=1, n=3):
  model, objective, mesh, rules, tx, state = _setup(config, mesh_sizes)
  step = ts.make_train_step(model, objective, tx, ema_decay=0.9,
                            grad_accum=accum, seed=0, mesh=mesh, rules=rules)
  out = []
  with sharding.use_mesh(mesh, rules):
    for _ in range(n):
      state, m = step(state, sharding.global_batch(_batch(), mesh))
      out.append(float(m["loss"]))
  return out, state


def test_gradient_accumulation_equals_the_large_batch(tiny_config):
  big, s1 = _steps(tiny_config, {"data": -1}, accum=1)
  acc, s4 = _steps(tiny_config, {"data": -1}, accum=2)
  np.testing.assert_allclose(acc, big, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6), s1.params, s4.params)


@pytest.mark.parametrize("mesh", [
    {"data": 8},                                  # data parallel
    {"fsdp": 8},                                  # FSDP / ZeRO-3
    {"data": 2, "fsdp": 2, "tensor": 2},          # FSDP + tensor parallel
])
def test_sharded_training_equals_one_device(tiny_config, mesh):
  tiny_config.model.hidden_size = 64
  tiny_config.model.num_heads = 4
  ref, _ = _steps_on(tiny_config, jax.devices()[:1], {"data": 1})
  got, state = _steps(tiny_config, mesh)
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  spec = lambda a: tuple(a.sharding.spec) + (None,) * (
      a.ndim - len(a.sharding.spec))
  block = state.params["blocks_0"]
  fsdp = "fsdp" if mesh.get("fsdp", 1) > 1 else None
  tensor = "tensor" if mesh.get("tensor", 1) > 1 else None
  assert spec(block["attn"]["qkv"]["kernel"]) == (fsdp, None, tensor, None)
  assert spec(block["mlp"]["fc1"]["kernel"]) == (fsdp, tensor)
  assert spec(block["mlp"]["fc2"]["kernel"]) == (tensor, fsdp)
  mu = state.opt_state[1][0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == state.params["blocks_0"]["mlp"]["fc1"][
      "kernel"].sharding.spec


def _steps_on(config, devices, sizes):
  model, objective = sampling.model_from_config(config)
  mesh = sharding.create_mesh(sizes, devices=devices)
  rules = sharding.DEFAULT_RULES
  tx, _ = ts.make_optimizer(config.optim, config.total_steps)
  state = ts.create_state(model, tx, mesh, rules, config.seed)
  step = ts.make_train_step(model, objective, tx, ema_decay=0.9, grad_accum=1,
                            seed=0, mesh=mesh, rules=rules)
  out = []
  with sharding.use_mesh(mesh, rules):
    for _ in range(3):
      state, m = step(state, sharding.global_batch(_batch(), mesh))
      out.append(float(m["loss"]))
  return out, state


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("objective", "gan", "objective must be one of"),
    ("ema_decay", 1.5, "ema_decay must be in"),
])
def test_bad_config_values(tiny_config, tmp_path, key, value, match):
  tiny_config[key] = value
  with pytest.raises(ValueError, match=match):
    train_lib.run(tiny_config, str(tmp_path))


def test_bad_model_name_and_missing_key(tiny_config, tmp_path):
  c = tiny_config.copy_and_resolve_references()
  c.model.name = "DiT-Q/2"
  with pytest.raises(ValueError, match="unknown model name 'DiT-Q/2'"):
    train_lib.run(c, str(tmp_path))
  c = tiny_config.copy_and_resolve_references()
  del c["optim"]
  with pytest.raises(ValueError, match=r"missing keys \['optim'\]"):
    train_lib.run(c, str(tmp_path))


def test_mesh_must_divide_devices_and_batch(tiny_config, tmp_path):
  tiny_config.mesh.data = 3
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    train_lib.run(tiny_config, str(tmp_path))
  tiny_config.mesh.data = 8
  tiny_config.batch_size = 12
  with pytest.raises(ValueError, match="must be divisible by the 8 devices"):
    train_lib.run(tiny_config, str(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
  train_lib.run(tiny_config, str(tmp_path), stop_at=2)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  tiny_config.optim.lr = 1e30  # diverges at once
  tiny_config.total_steps = 8
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    train_lib.run(tiny_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_checkpoint_of_another_model_is_refused(tiny_config, tmp_path):
  train_lib.run(tiny_config, str(tmp_path), stop_at=2)
  tiny_config.model.hidden_size = 64
  with pytest.raises(ValueError, match="does not fit model"):
    train_lib.run(tiny_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_sample_cli_writes_npz_and_grid(tiny_config, tmp_path):
  train_lib.run(tiny_config, str(tmp_path / "run"))
  out = tmp_path / "out" / "samples.npz"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--checkpoint",
         str(tmp_path / "run"), "--num_samples", "6", "--steps", "3",
         "--labels", "1,2", "--cfg_scale", "2", "--out", str(out)]
  subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
  data = np.load(out)
  assert data["arr_0"].shape == (6, 8, 8, 1) and data["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(data["arr_1"], [1, 2, 1, 2, 1, 2])
  assert out.with_suffix(".png").exists()
  bad = subprocess.run(cmd[:3] + [str(tmp_path / "nope")], env=env, cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "does not exist" in bad.stderr
  bad = subprocess.run(cmd + ["--labels", "10"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "labels must be in [0, 10)" in bad.stderr
  cached = tmp_path / "out" / "cached.npz"
  # Feature caching, CFG-rescale and a larger grid (positions interpolated),
  # on 1 device from a checkpoint written on 8, guided by its first
  # checkpoint (autoguidance) with adaptive projected guidance.
  one_device = {**env, "XLA_FLAGS": FAST_COMPILE}
  first = min((d for d in os.listdir(tmp_path / "run" / "checkpoints")
               if d.isdigit()), key=int)
  subprocess.run(cmd[:-1] + [str(cached), "--cache_interval", "2",
                             "--cfg_rescale", "0.5", "--input_size", "12,8",
                             "--extrapolation", "interpolate",
                             "--apg_eta", "0", "--apg_momentum", "-0.5",
                             "--guide_checkpoint",
                             str(tmp_path / "run" / "checkpoints" / first)],
                 check=True, env=one_device, cwd=ROOT, capture_output=True)
  assert np.load(cached)["arr_0"].shape == (6, 12, 8, 1)
  bad = subprocess.run(cmd + ["--cache_blocks", "2"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "cache blocks must be" in bad.stderr
  bad = subprocess.run(cmd + ["--extrapolation", "ntk"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "applies with --input_size" in bad.stderr


def test_load_for_sampling_rejects_foreign_directories(tmp_path):
  (tmp_path / "stuff").mkdir()
  (tmp_path / "stuff" / "a.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="holds no jdit checkpoint"):
    checkpoint.load_for_sampling(str(tmp_path / "stuff"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_for_sampling(str(tmp_path / "missing"))


def test_flow_objective_by_one_flag(tiny_config, tmp_path):
  tiny_config.objective = "flow"
  tiny_config.total_steps = 2
  tiny_config.sample.per_class = 1
  tiny_config.sample.steps = 2
  train_lib.run(tiny_config, str(tmp_path))
  model, objective = sampling.model_from_config(tiny_config)
  assert objective.name == "flow" and not model.learn_sigma
  assert all(np.isfinite(l) for _, l in losses(tmp_path))
  assert np.load(tmp_path / "samples_step2.npz")["arr_0"].shape == (10, 8, 8,
                                                                     1)


def test_ema_warmup_schedule():
  assert float(ts.ema_decay_at(0, 0.999, True)) == pytest.approx(0.1)
  assert float(ts.ema_decay_at(990, 0.999, True)) == pytest.approx(0.991)
  assert float(ts.ema_decay_at(10**6, 0.999, True)) == pytest.approx(0.999)
  assert float(ts.ema_decay_at(0, 0.9999, False)) == pytest.approx(0.9999)
