"""bench/train_step.py runs end to end (tiny model on CPU) and prints JSON."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jdit import models
from jdit.models.dit import DiT
from jdit.models.registry import register_model, smoke_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The default (a DiT) and a family with its own options (DiT-MoE's expert
# widths). Every registered name building at its smoke size, LaMamba-Diff's
# own fields included, is tested below without the 40 s subprocess each.
@pytest.mark.parametrize("model", [None, "DiT-MoE-S/2-8E2A"])
def test_train_step_bench_smoke(model, tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "bench", "train_step.py"),
       "--smoke", "--profile", str(tmp_path)]
      + (["--model", model] if model else []),
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  assert len(lines) == 1, proc.stdout
  row = json.loads(lines[0])
  assert row["what"] == "train_step" and row["platform"] == "cpu"
  assert row["model"] == (model or "DiT-S/4") and row["smoke"]
  assert row["images_per_sec"] > 0 and row["step_time_ms"] > 0
  assert row["train_gflops_per_image"] > 0 and row["matmul_peak_tflops"] > 0
  assert 0 < row["mfu_vs_matmul_peak"] < 1
  assert row["datasheet_peak_tflops"] is None  # no datasheet for a CPU
  assert row["batch_size"] % row["devices"] == 0
  # --profile traced the extra steps; a CPU trace has no device tracks to
  # summarise (bench_profile_test.py reads a real one).
  assert list(tmp_path.glob("**/*.trace.json.gz"))
  assert row["profile"] is None


def test_sampling_bench_smoke():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "bench", "sampling.py"),
       "--smoke", "--cache_interval", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines()
          if l.startswith("{")]
  assert len(rows) == 1, proc.stdout
  row = rows[0]
  assert row["what"] == "sampling" and row["cfg"] and row["steps"] == 2
  # CFG doubles the model batch: 2 forwards per image per step.
  assert row["forwards_per_sec"] == pytest.approx(
      row["images_per_sec"] * 2 * row["steps"], rel=1e-3)
  # The cached run is timed beside it: 2 steps, one of them reusing blocks.
  assert row["cache_interval"] == 2 and row["blocks_computed"] == 0.5
  assert row["cached_images_per_sec"] > 0 and row["cache_speedup"] > 0


def test_every_model_has_smoke_overrides_that_build():
  """--smoke works for every registered name: its family's overrides fit
  the smoke's 64px image (8x8 latents). Shapes only (eval_shape)."""
  for name in sorted(models.MODELS):
    model = models.build_model(name, input_size=8, in_channels=4,
                               **smoke_overrides(name))
    x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
    params = sum(math.prod(l.shape) for l in jax.tree.leaves(shapes))
    assert params < 2e6, (name, params)  # small enough for seconds on a CPU


def test_smoke_overrides_errors():
  with pytest.raises(ValueError, match="unknown model name 'DiT-Q/2'"):
    smoke_overrides("DiT-Q/2")
  register_model("test-no-smoke", DiT, depth=1, hidden_size=32, num_heads=2)
  try:
    with pytest.raises(ValueError, match="registered no smoke overrides"):
      smoke_overrides("test-no-smoke")
  finally:
    del models.MODELS["test-no-smoke"]


def test_datasheet_peaks():
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  try:
    import train_step  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  peak = train_step.datasheet_tflops
  assert peak("NVIDIA H100 80GB HBM3") == 989.4
  assert peak("NVIDIA H200") == 989.4
  assert peak("NVIDIA A100-SXM4-80GB") == 312.0
  assert peak("TPU v5 lite") == 197.0 and peak("TPU v5p") == 459.0
  assert peak("TPU v4") == 275.0 and peak("TPU v6 lite") == 918.0
  assert peak("cpu") is None


@pytest.mark.parametrize("script,fields", [
    ("attention.py", ("what", "time_ms", "device", "jax")),
    ("scan.py", ("what", "ms", "gbs", "copy_ratio")),
    ("linear_attention.py", ("what", "ms", "gbs", "copy_ratio")),
    ("trace.py", ("what", "model", "trace_s", "unshared_trace_s", "speedup")),
    # Every mixer family compiles twice (forward, train step): minutes on
    # CPU, and tests/models/mixers_test.py covers the mixers themselves.
    pytest.param("mixers.py", ("what", "mixer", "time_ms", "speedup"),
                 marks=pytest.mark.slow),
])
def test_kernel_benches_smoke(script, fields):
  """Each benchmark runs at a tiny size on CPU and prints JSON lines."""
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "bench", script), "--smoke"],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines()
          if l.startswith("{")]
  assert rows, proc.stdout
  for row in rows:
    if "error" in row:
      continue
    for field in fields:
      assert field in row, (field, row)


def test_sampling_bench_full_size_path_counts_flops(tmp_path):
  """Without --smoke the bench multiplies the model's analytic FLOPs by the
  forwards per second (a tiny registered model stands in for DiT-XL/2);
  a learned cache schedule is timed beside it."""
  import argparse  # pylint: disable=g-import-not-at-top
  from jdit import learn_cache  # pylint: disable=g-import-not-at-top
  router = tmp_path / "router.json"
  router.write_text(json.dumps({"format": learn_cache.ROUTER_FORMAT,
                                "sampler": "ddim", "steps": 2,
                                "schedule": [[1], [0]]}))
  register_model("test-sampling-tiny", DiT, depth=1, hidden_size=32,
                 num_heads=2)
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  try:
    import sampling  # pylint: disable=g-import-not-at-top
    row = sampling.bench(argparse.Namespace(
        model="test-sampling-tiny", image_size=64,
        batch_size=jax.device_count(),
        dtype="float32", objective="ddpm", sampler="ddim", steps=2,
        cfg_scale=1.5, repeats=1, smoke=False, cache_interval=1,
        cache_warmup=0, cache_router=str(router)))
  finally:
    sys.path.pop(0)
    del models.MODELS["test-sampling-tiny"]
  assert row["tflops_per_device"] > 0 and not row["smoke"]
  assert row["cache_router"] == str(router) and row["blocks_computed"] == 0.5
  assert row["cache_speedup"] > 0
