"""Stopping cleanly when the job is about to be preempted.

Cloud TPU spot and preemptible VMs, SLURM and Kubernetes send SIGTERM some
seconds before they kill a job. `Preemption.reached(step)` turns that into
a step at which the trainer checkpoints and returns, so that re-running the
same command resumes there instead of at the last periodic checkpoint.
With several processes, JAX's preemption service (started by
jax.distributed) receives the signal and all hosts agree on the step
(`multihost_utils.reached_preemption_sync_point`); with one, a SIGTERM
handler installed for the duration of training sets a flag.
"""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """`with Preemption() as p: ... if p.reached(step): save and stop`."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._service_missing = False

  def __enter__(self) -> Preemption:
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._request)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _request(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop (the same on every host)."""
    if jax.process_count() == 1:
      return self.requested
    if self._service_missing:
      return False
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # jax.distributed without the service
      self._service_missing = True
      print(f"warning: no preemption notices on this job ({e}); it will "
            f"resume from its last periodic checkpoint if preempted")
      return False
