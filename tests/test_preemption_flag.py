"""PreemptionFlag's three modes without a training run: one process (a Python handler),
several with JAX's preemption service (its sync point, no Python handler) and several
without it (an all-gather every n-th check). Multi-process runs are simulated by
replacing jax.process_count and the multihost_utils calls."""

import os
import signal

import numpy as np
import pytest

from skipganomaly_jax.training import preemption
from skipganomaly_jax.training.preemption import PreemptionFlag


def test_single_process_flag_is_set_by_sigterm_and_restored():
  before = signal.getsignal(signal.SIGTERM)
  flag = PreemptionFlag()
  try:
    assert not flag.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested()
  finally:
    flag.restore()
  assert signal.getsignal(signal.SIGTERM) == before


@pytest.fixture
def two_processes(monkeypatch):
  monkeypatch.setattr(preemption.jax, 'process_count', lambda: 2)


def test_jax_service_counts_checks_and_latches(two_processes, monkeypatch):
  calls = []

  def reached(step_id):
    calls.append(step_id)
    return step_id == 3

  monkeypatch.setattr(preemption, '_preemption_service', lambda: True)
  monkeypatch.setattr(preemption.multihost_utils, 'reached_preemption_sync_point', reached)
  before = signal.getsignal(signal.SIGTERM)
  flag = PreemptionFlag()
  flag.arm()
  assert signal.getsignal(signal.SIGTERM) == before  # JAX's handler stays in place.
  assert [flag.requested() for _ in range(3)] == [False, False, True]
  assert flag.requested()  # Latched: no further sync-point calls.
  assert calls == [1, 2, 3]
  flag.restore()


def test_fallback_all_gathers_every_nth_check(two_processes, monkeypatch):
  gathered = []

  def allgather(value):
    gathered.append(int(value))
    return np.array([int(value), 0])

  monkeypatch.setattr(preemption, '_preemption_service', lambda: False)
  monkeypatch.setattr(preemption.multihost_utils, 'process_allgather', allgather)
  flag = PreemptionFlag(fallback_every=3)
  try:
    assert [flag.requested() for _ in range(3)] == [False] * 3
    os.kill(os.getpid(), signal.SIGTERM)
    # Set locally, but acted on only when all processes agree: at the next all-gather.
    assert [flag.requested() for _ in range(3)] == [False, False, True]
    assert gathered == [0, 1]
  finally:
    flag.restore()
