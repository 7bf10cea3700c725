"""SIGTERM (a preemption notice) as a flag that the training loop polls.

Training checks it after every step and between evaluation batches, then saves a
checkpoint and returns (train.py). A check never waits for the devices or the network:

- One process: SIGTERM runs a Python handler that sets a bool; a check reads it.
- Several processes: all of them must stop at the same check, without a collective per
  check. JAX's preemption service does that (`jax.distributed.initialize` starts it;
  `multihost_utils.reached_preemption_sync_point`): its own SIGTERM handler (C++,
  polled every second) tells the coordination service, whose background protocol
  collects every process's check counter and sets the sync point to the largest + 1.
  A check is a mutex-guarded comparison of the counter with that point; every process
  makes the same sequence of checks, so all of them reach it at the same step or
  evaluation batch. No Python handler is installed then: it would replace JAX's.
- Several processes with the service disabled (`jax_enable_preemption_service=False`):
  an all-gather of the flags every `fallback_every`-th check, the others return False.

Latency from SIGTERM to the stop, and the costs: benchmarks/preemption_latency.py.

In one process the handler is installed by `arm` (training calls it once the first step
is compiled and dispatched) or at the first check: Python runs signal handlers between
bytecodes, so a handler would wait for the first step's compilation (tens of seconds on
a CPU); before it SIGTERM keeps its default action and ends the process at once, with
nothing to save. JAX's handler (several processes) is a C one, installed when the
distributed runtime starts: a SIGTERM during start-up or compilation is kept, and the
run stops at its first check.
"""

import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def _preemption_service() -> bool:
  """Whether JAX's preemption sync manager runs in this (multi-process) job."""
  try:
    from jax._src import distributed  # noqa: PLC0415  (no public accessor)
  except ImportError:
    return False
  state = getattr(distributed, 'global_state', None)
  return getattr(state, 'preemption_sync_manager', None) is not None


class PreemptionFlag:
  """Set by SIGTERM; agreed on by all processes before anyone acts on it.

  Once `requested` returns True it keeps returning True. Single-process and fallback
  modes install a Python handler at `arm` or the first `requested`; `restore` puts the
  previous one back.

  Args:
    fallback_every: several processes without JAX's preemption service only: all-gather
      the flags on every n-th call of `requested` (the others return False); 1 = every
      call.
  """

  def __init__(self, fallback_every: int = 10):
    self._set = False  # This process's SIGTERM (Python handler).
    self._agreed = False  # Several processes: all of them stop at this check.
    self._calls = 0
    self._every = max(1, int(fallback_every))
    self._installed, self._previous = False, None
    self._mode = None  # 'local', 'jax' or 'allgather'; decided at the first use.

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step, then exiting.')
    self._set = True

  def _decide(self) -> str:
    if self._mode is None:
      if jax.process_count() == 1:
        self._mode = 'local'
      else:
        self._mode = 'jax' if _preemption_service() else 'allgather'
      logging.info('Preemption checks: %s.', self._mode)
    return self._mode

  def arm(self) -> None:
    """Installs the Python handler (once, unless JAX's is used); from now on SIGTERM
    only sets the flag."""
    if not self._installed and self._decide() != 'jax':
      self._installed, self._previous = True, signal.signal(signal.SIGTERM, self._handler)

  def requested(self) -> bool:
    """Whether any process received SIGTERM (the same answer in every process)."""
    if self._agreed:
      return True
    self.arm()
    if self._mode == 'local':
      return self._set
    self._calls += 1
    if self._mode == 'jax':
      self._agreed = multihost_utils.reached_preemption_sync_point(self._calls)
    elif self._calls % self._every == 0:
      self._agreed = bool(multihost_utils.process_allgather(np.int32(self._set)).max())
    if self._agreed:
      logging.warning('Preemption agreed by all processes at check %d.', self._calls)
    return self._agreed

  def restore(self) -> None:
    """Reinstalls the SIGTERM handler that was there before (Python handlers only)."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
      self._installed = False
