"""SIGTERM (a preemption notice) as a flag that the training loop polls.

The handler only sets a flag; training checks it after every step and evaluation between
batches, then saves a checkpoint and returns (train.py). In a single process a check is
a read of a Python bool. With several processes all of them must stop at the same step,
so a check is an all-gather of the flags: a collective that waits for the devices, made
every `multi_process_every` checks (see benchmarks/preemption_latency.py for its cost).

The handler is installed by `arm` (training calls it once the first step is compiled
and dispatched) or at the first check. Python runs signal handlers between bytecodes, so
a handler would wait for the first step's compilation (tens of seconds on a CPU); before
it SIGTERM keeps its default action and ends the process at once, with nothing to save.
"""

import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionFlag:
  """Set by SIGTERM; agreed on by all processes before anyone acts on it.

  Installs its handler at `arm` or the first `requested`; `restore` puts the previous
  one back.

  Args:
    multi_process_every: with several processes, all-gather the flags only on every
      n-th call of `requested` (the others return False); 1 = every call.
  """

  def __init__(self, multi_process_every: int = 1):
    self._set = False
    self._calls = 0
    self._every = max(1, int(multi_process_every))
    self._installed, self._previous = False, None

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step, then exiting.')
    self._set = True

  def arm(self) -> None:
    """Installs the handler (once); from now on SIGTERM only sets the flag."""
    if not self._installed:
      self._installed, self._previous = True, signal.signal(signal.SIGTERM, self._handler)

  def requested(self) -> bool:
    """Whether any process received SIGTERM (the same answer in every process)."""
    self.arm()
    if jax.process_count() == 1:
      return self._set
    self._calls += 1
    if self._calls % self._every:
      return False
    return bool(multihost_utils.process_allgather(np.int32(self._set)).max())

  def restore(self) -> None:
    """Reinstalls the SIGTERM handler that was there before."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
      self._installed = False
