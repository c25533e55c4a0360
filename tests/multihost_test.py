"""Real multi-process training: two CPU processes joined by jax.distributed.

Each process owns 2 CPU devices (4 global), reads its own half of every
batch, and the two train one model through the gloo CPU collectives, as the
hosts of a TPU slice do over the network. The losses must equal one process
with 4 devices; only process 0 writes logs; both write the checkpoint.
(Restoring onto other meshes and device counts is tested in-process in
train_test.py.)
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.batch_size=16", "--config.total_steps=4",
         "--config.log_every=1", "--config.checkpoint_every=2",
         "--config.model.depth=1", "--config.model.hidden_size=32",
         "--config.model.num_heads=2", "--config.optim.warmup_steps=1",
         "--config.sample.per_class=0"]


def _env(devices: int, tfds_dir: str, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JDIT_")}
  env.update(JAX_PLATFORMS="cpu", TFDS_DATA_DIR=tfds_dir,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + FAST_COMPILE,
             **extra)
  return env


def _train(workdir, env, *flags):
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"), "--workdir",
       str(workdir), *FLAGS, *flags], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, what):
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, f"{what} failed:\n{out[-3000:]}"


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tfds_dir, tmp_path):
  # Prepare the dataset once, in the single-process reference run, so the
  # two processes do not race to build it.
  single = tmp_path / "single"
  _finish(_train(single, _env(4, tfds_dir)), "single-process run")
  multi = tmp_path / "multi"
  coordinator = f"localhost:{_free_port()}"
  procs = [_train(multi, _env(2, tfds_dir, JDIT_COORDINATOR=coordinator,
                              JDIT_NUM_PROCESSES="2",
                              JDIT_PROCESS_ID=str(i)))
           for i in range(2)]
  try:
    for i, proc in enumerate(procs):
      _finish(proc, f"process {i}")
  finally:  # a failed process must not leave its peer waiting for it
    for proc in procs:
      if proc.poll() is None:
        proc.kill()

  steps, expected = _losses(single)
  got_steps, got = _losses(multi)
  assert got_steps == steps == [1, 2, 3, 4]  # one writer: no duplicate rows
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]

