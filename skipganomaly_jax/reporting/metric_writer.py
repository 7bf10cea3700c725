"""Scalar metrics to TensorBoard event files (tensorboardX, no TensorFlow) and JSON lines.

Only process 0 writes; `MetricWriter(..., enabled=False)` in the other processes makes
every call a no-op, so training code stays free of process checks.
"""

import json
import os

from tensorboardX import SummaryWriter

from skipganomaly_jax.reporting.outputs import AUROC_KEYS

# Report keys of the run's own score (config.score_kind): tagged '<key>/<score kind>'.
OWN_SCORE_KEYS = (
  'auroc',
  'average_precision',
  'f1',
  'precision',
  'recall',
  'threshold',
  'mean_score_normal',
  'mean_score_abnormal',
  'val_score',
)


def eval_scalars(report: dict) -> dict:
  """An evaluation report's numbers under tags that name their score.

  Every score's AUROC is 'auroc/<kind>' ('auroc/paper', 'auroc/latent_knn',
  'auroc/map_max', 'auroc/map_topk'; the run's own score's is among them); the run's own
  score's other metrics are '<metric>/<kind>' ('f1/map_topk', 'threshold/paper', ...);
  the reference protocol's AUROC (of the paper score) is 'auroc/paper_reference_protocol';
  the rest (pixel_auroc, pro, counts, epoch, step) keep their names. Same values.
  """
  kind = report['score_kind']
  own = {f'{k}/{kind}': report[k] for k in OWN_SCORE_KEYS if k in report}
  others = {f'auroc/{k}': report[key] for k, key in AUROC_KEYS.items() if key in report}
  renamed = {'reference_protocol_auroc': 'auroc/paper_reference_protocol'}
  tagged = {**others, **own}
  for k, v in report.items():
    if k in OWN_SCORE_KEYS or k in AUROC_KEYS.values() or not isinstance(v, int | float):
      continue
    tagged[renamed.get(k, k)] = v
  return {k: v for k, v in tagged.items() if isinstance(v, int | float)}


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
