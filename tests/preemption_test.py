"""jdit.preemption without a trainer (the trainer's use is in train_test)."""
import os
import signal

import jax
from jax.experimental import multihost_utils

from jdit import preemption


def test_one_process_flags_sigterm_while_entered():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Preemption() as notice:
    assert not notice.reached(5)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(6)
  assert signal.getsignal(signal.SIGTERM) is before


def test_several_processes_ask_jax_and_survive_its_absence(monkeypatch,
                                                          capsys):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  asked = []

  def sync_point(step):
    asked.append(step)
    if step == 3:
      raise RuntimeError("Preemption sync manager has not been initialized")
    return step == 2

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      sync_point)
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Preemption() as notice:
    assert signal.getsignal(signal.SIGTERM) is before  # JAX's to handle
    assert [notice.reached(s) for s in (1, 2, 3, 4)] == [False, True, False,
                                                         False]
  assert asked == [1, 2, 3]  # not asked again once it is known missing
  assert "no preemption notices" in capsys.readouterr().out
