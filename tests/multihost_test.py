"""Real multi-process training: two CPU processes joined by jax.distributed.

Each process owns 2 CPU devices (4 global), reads its own half of every
batch, and the two train one model through the gloo CPU collectives, as the
hosts of a TPU slice do over the network. A preemption notice (SIGTERM) to
one of them stops both at the same step, checkpointed; the same command
resumes there. The losses must equal one process with 4 devices; only
process 0 writes logs; both write the checkpoints. (Restoring onto other
meshes and device counts is tested in-process in train_test.py.)
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from jdit import data
from tests.conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A constant learning rate: the schedule does not depend on total_steps, so
# a run cut short and resumed to a nearer end trains as that shorter run.
FLAGS = ["--config.batch_size=16", "--config.log_every=1",
         "--config.checkpoint_every=1000", "--config.model.depth=1",
         "--config.model.hidden_size=32", "--config.model.num_heads=2",
         "--config.optim.warmup_steps=1", "--config.optim.schedule=constant",
         "--config.sample.per_class=0"]


def _env(devices: int, tfds_dir: str, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JDIT_")}
  env.update(JAX_PLATFORMS="cpu", TFDS_DATA_DIR=tfds_dir,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + FAST_COMPILE,
             **extra)
  return env


def _train(workdir, env, *flags):
  # Output to a file, not a pipe: nobody reads a pipe while the test waits,
  # and a full one would block the process.
  log = tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "train.py"), "--workdir",
       str(workdir), *FLAGS, *flags], cwd=ROOT, env=env, stdout=log,
      stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _output(proc) -> str:
  proc.log.seek(0)
  return proc.log.read()[-3000:]


def _finish(proc, what, timeout=600):
  proc.wait(timeout=timeout)
  assert proc.returncode == 0, f"{what} failed:\n{_output(proc)}"


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(workdir, tfds_dir, *flags):
  coordinator = f"localhost:{_free_port()}"
  return [_train(workdir, _env(2, tfds_dir, JDIT_COORDINATOR=coordinator,
                               JDIT_NUM_PROCESSES="2",
                               JDIT_PROCESS_ID=str(i)), *flags)
          for i in range(2)]


def _finish_all(procs, timeout=600):
  try:
    for i, proc in enumerate(procs):
      _finish(proc, f"process {i}", timeout)
  finally:  # a failed process must not leave its peer waiting for it
    for proc in procs:
      if proc.poll() is None:
        proc.kill()


def _wait_for_step(workdir, step, procs, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while not (os.path.exists(path) and sum(1 for _ in open(path)) >= step):
    for proc in procs:
      if proc.poll() is not None:
        raise AssertionError(f"a process ended before step {step}:\n"
                             f"{_output(proc)}")
    assert time.time() < deadline, f"no step {step} in {timeout} s"
    time.sleep(0.1)


def test_two_processes_train_like_one_and_stop_together(tfds_dir, tmp_path):
  data.load_source("digits", data_dir=tfds_dir)  # built once, not raced
  multi = tmp_path / "multi"
  # Far from its end when the notice comes, to one host only (a maintenance
  # event on one VM): both stop at the step the service agrees on.
  procs = _two_processes(multi, tfds_dir, "--config.total_steps=100000")
  try:
    _wait_for_step(multi, 3, procs)
    procs[1].send_signal(signal.SIGTERM)
  finally:
    _finish_all(procs, timeout=120)  # not the 100000 steps
  steps, _ = _losses(multi)
  stop = steps[-1]
  assert steps == list(range(1, stop + 1))  # one writer: no duplicate rows
  assert os.listdir(multi / "checkpoints") == [str(stop)]
  # The same command (to a nearer end) resumes at the preempted step.
  _finish_all(_two_processes(multi, tfds_dir,
                             f"--config.total_steps={stop + 2}"))
  single = tmp_path / "single"
  _finish(_train(single, _env(4, tfds_dir), f"--config.total_steps={stop + 2}"),
          "single-process run")
  steps, expected = _losses(single)
  got_steps, got = _losses(multi)
  assert got_steps == steps == list(range(1, stop + 3))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert sorted(os.listdir(multi / "checkpoints"), key=int) == [
      str(stop), str(stop + 2)]
