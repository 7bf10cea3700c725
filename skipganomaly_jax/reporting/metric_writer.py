"""Scalar metrics to TensorBoard event files (tensorboardX, no TensorFlow) and JSON lines.

Only process 0 writes; `MetricWriter(..., enabled=False)` in the other processes makes
every call a no-op, so training code stays free of process checks.
"""

import json
import os

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars to `workdir/tensorboard/` and appends them to `workdir/metrics.jsonl`.

  Args:
    workdir: the run's directory.
    enabled: False in every process but 0.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')  # noqa: SIM115

  def write_scalars(self, step: int, scalars: dict, prefix: str = '') -> None:
    """Writes one record {step, name: value, ...}; names get `prefix` in TensorBoard."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(prefix + name, value, step)
    record = {'step': int(step), **{prefix + k: v for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False
