"""bench/train_step.py runs end to end (tiny model on CPU) and prints JSON."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_bench_smoke():
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "bench", "train_step.py"),
       "--smoke"], capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  assert len(lines) == 1, proc.stdout
  row = json.loads(lines[0])
  assert row["what"] == "train_step" and row["platform"] == "cpu"
  assert row["images_per_sec"] > 0 and row["step_time_ms"] > 0
  assert row["train_gflops_per_image"] > 0 and row["matmul_peak_tflops"] > 0
  assert 0 < row["mfu_vs_matmul_peak"] < 1
  assert row["datasheet_peak_tflops"] is None  # no datasheet for a CPU
  assert row["batch_size"] % row["devices"] == 0


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
