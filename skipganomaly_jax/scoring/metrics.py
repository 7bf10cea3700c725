"""Anomaly-detection metrics and score calibration, in plain numpy.

Labels are 0 (normal) / 1 (abnormal); scores are raw anomaly scores, higher = more
anomalous (see docs/method.md, "Anomaly scores"). The ranking metrics (`auroc`,
`average_precision`, `roc_curve`) follow scikit-learn's definitions exactly, ties
included, without depending on scikit-learn at runtime.

`Calibration` is fitted on held-out *normal* (validation) scores only, never on test
data: it stores a decision threshold (a percentile of the validation-normal scores) and
their min-max range, and is saved with the checkpoint so that a single image can be
scored and classified on its own. Normalised scores are in units of the threshold
(`NORMALISED_SCORE`): 1.0 is exactly the threshold.
"""

import dataclasses
import math
from typing import Any

import numpy as np

# What `Calibration.normalise` (scores.csv's normalised_score) is, in words.
NORMALISED_SCORE = (
  'score / threshold: 1.0 is the threshold (above 1 = anomalous), 0 a score of 0; the '
  "threshold is the threshold_percentile-th percentile of the validation normals' scores"
)


def _as_scores(scores: Any, name: str = 'scores') -> np.ndarray:
  """Returns `scores` as a 1-D float64 array, rejecting NaN and infinite values."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {scores.shape}')
  if scores.size == 0:
    raise ValueError(f'{name} is empty')
  bad = ~np.isfinite(scores)
  if bad.any():
    idx = np.flatnonzero(bad)
    raise ValueError(
      f'{name} contains {idx.size} NaN or infinite value(s), first at index {idx[0]} '
      f'({scores[idx[0]]})'
    )
  return scores


def _check_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates labels (0/1, both classes present) and scores (finite, same length).

  Args:
    labels: 1-D array-like of 0 (normal) / 1 (abnormal), or booleans.
    scores: 1-D array-like of anomaly scores, higher = more anomalous.

  Returns:
    (labels as an int64 array, scores as a float64 array).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}')
  scores = _as_scores(scores)
  if labels.shape[0] != scores.shape[0]:
    raise ValueError(
      f'labels and scores differ in length: {labels.shape[0]} labels, {scores.shape[0]} scores'
    )
  values = np.unique(labels)
  if not np.isin(values, [0, 1]).all():
    raise ValueError(f'labels must be 0 (normal) or 1 (abnormal), found values {values[:10]}')
  if values.size < 2:
    raise ValueError(
      f'labels contain one class only ({int(values[0])}): these metrics need both '
      'normal (0) and abnormal (1) examples'
    )
  return labels.astype(np.int64), scores


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Returns 1-based ranks of `x`, tied values sharing the average of their ranks."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  last_rank = np.cumsum(counts)  # 1-based rank of the last element of each tie group.
  return (last_rank - (counts - 1) / 2.0)[inverse]


def auroc(labels: Any, scores: Any) -> float:
  """Area under the ROC curve, equal to sklearn's `roc_auc_score` (ties count one half).

  Args:
    labels: 1-D array-like of 0 (normal) / 1 (abnormal).
    scores: 1-D array-like of anomaly scores, higher = more anomalous.

  Returns:
    The AUROC in [0, 1].
  """
  labels, scores = _check_inputs(labels, scores)
  ranks = _average_ranks(scores)
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  # Mann-Whitney U statistic of the abnormal scores, normalised.
  u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray):
  """True/false positive counts at each distinct score, taken as a threshold (>=).

  Returns:
    (fps, tps, thresholds), thresholds in decreasing order.
  """
  order = np.argsort(scores, kind='mergesort')[::-1]
  scores = scores[order]
  labels = labels[order]
  # Index of the last element of each group of equal scores.
  distinct = np.flatnonzero(np.diff(scores))
  ends = np.r_[distinct, labels.size - 1]
  tps = np.cumsum(labels)[ends]
  fps = ends + 1 - tps
  return fps, tps, scores[ends]


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The full ROC curve, as sklearn's `roc_curve(..., drop_intermediate=False)`.

  Args:
    labels: 1-D array-like of 0 (normal) / 1 (abnormal).
    scores: 1-D array-like of anomaly scores, higher = more anomalous.

  Returns:
    (fpr, tpr, thresholds): one point per distinct score (a point is anomalous at a
    threshold when its score >= threshold), preceded by (0, 0) at threshold +inf.
  """
  labels, scores = _check_inputs(labels, scores)
  fps, tps, thresholds = _cumulative_counts(labels, scores)
  fpr = np.r_[0.0, fps / fps[-1]]
  tpr = np.r_[0.0, tps / tps[-1]]
  return fpr, tpr, np.r_[np.inf, thresholds]


def average_precision(labels: Any, scores: Any) -> float:
  """Average precision, equal to sklearn's `average_precision_score`.

  AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (no interpolation).

  Args:
    labels: 1-D array-like of 0 (normal) / 1 (abnormal); abnormal is the positive class.
    scores: 1-D array-like of anomaly scores, higher = more anomalous.

  Returns:
    The average precision in [0, 1].
  """
  labels, scores = _check_inputs(labels, scores)
  fps, tps, _ = _cumulative_counts(labels, scores)
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_at_threshold(labels: Any, scores: Any, threshold: float) -> dict[str, float]:
  """F1, precision and recall of the rule "score > threshold = anomalous".

  Precision is 0 when nothing is predicted anomalous, and F1 is 0 when precision and
  recall are both 0 (sklearn's values with `zero_division=0`).

  Args:
    labels: 1-D array-like of 0 (normal) / 1 (abnormal).
    scores: 1-D array-like of anomaly scores, higher = more anomalous.
    threshold: the decision threshold.

  Returns:
    {'f1': ..., 'precision': ..., 'recall': ...} as Python floats.
  """
  labels, scores = _check_inputs(labels, scores)
  predicted = scores > threshold
  tp = int(np.sum(predicted & (labels == 1)))
  num_predicted = int(predicted.sum())
  precision = tp / num_predicted if num_predicted else 0.0
  recall = tp / int(labels.sum())
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return {'f1': float(f1), 'precision': float(precision), 'recall': float(recall)}


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Score calibration fitted on validation-normal scores (never on test data).

  Attributes:
    score_min: the minimum validation-normal score.
    score_max: the maximum validation-normal score.
    threshold: the `percentile`-th percentile of validation-normal scores; scores above
      it are classified anomalous.
    percentile: the percentile (0-100) used for the threshold.
    num_val: the number of validation scores the calibration was fitted on.
  """

  score_min: float
  score_max: float
  threshold: float
  percentile: float
  num_val: int

  @classmethod
  def fit(cls, val_scores: Any, percentile: float) -> 'Calibration':
    """Fits the calibration on anomaly scores of held-out normal images.

    Args:
      val_scores: 1-D array-like of scores of validation images, all normal.
      percentile: in [0, 100]; the threshold is this percentile of `val_scores`
        (linear interpolation, numpy's default), so about (100 - percentile)% of normal
        images are expected to be flagged anomalous.

    Returns:
      The fitted `Calibration`.
    """
    val_scores = _as_scores(val_scores, 'val_scores')
    if not 0.0 <= percentile <= 100.0:
      raise ValueError(f'percentile must be in [0, 100], got {percentile}')
    return cls(
      score_min=float(val_scores.min()),
      score_max=float(val_scores.max()),
      threshold=float(np.percentile(val_scores, percentile)),
      percentile=float(percentile),
      num_val=int(val_scores.size),
    )

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-safe dict (Python floats and an int)."""
    return {
      'score_min': float(self.score_min),
      'score_max': float(self.score_max),
      'threshold': float(self.threshold),
      'percentile': float(self.percentile),
      'num_val': int(self.num_val),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'Calibration':
    """Rebuilds a calibration from `to_dict()` output (e.g. read from a checkpoint)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in fields if name not in d]
    if missing:
      raise ValueError(f'calibration dict lacks {missing}; got keys {sorted(d)}')
    values = {name: float(d[name]) for name in fields if name != 'num_val'}
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    if bad:
      raise ValueError(f'calibration values {bad} are not finite: {d}')
    return cls(**values, num_val=int(d['num_val']))

  def normalise(self, scores: Any) -> np.ndarray:
    """Scores in units of the threshold: score / threshold (`NORMALISED_SCORE`).

    1.0 is exactly the threshold: a normalised score above 1 is anomalous, as the raw
    score above the threshold is (`is_anomalous`); 2.0 is twice the threshold. Every
    score kind here is >= 0 with 0 meaning no difference at all (a perfect
    reconstruction, a code equal to a training normal's), so the ratio keeps that zero
    and needs no offset, and it stays meaningful for scores near zero (e.g. a paper
    score of 1e-3 with a threshold of 2e-3 is 0.5). One fixed increasing map fitted on
    validation normals only: no ranking metric changes and a single image can be
    scored. A threshold <= 0 (degenerate: most validation normals scored 0 or less)
    cannot divide; then score - threshold + 1, which still puts the threshold at 1.

    Args:
      scores: array-like of raw anomaly scores.

    Returns:
      The normalised scores, float64, same shape.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if self.threshold > 0:
      return scores / self.threshold
    return scores - self.threshold + 1.0

  def is_anomalous(self, scores: Any) -> np.ndarray:
    """Returns a boolean array: True where a raw score is above the threshold."""
    return np.asarray(scores, dtype=np.float64) > self.threshold


def evaluate(labels: Any, scores: Any, calibration: Calibration) -> dict[str, Any]:
  """All test metrics of one evaluation, as a JSON-safe dict.

  Args:
    labels: 1-D array-like of 0 (normal) / 1 (abnormal).
    scores: 1-D array-like of raw anomaly scores, higher = more anomalous.
    calibration: fitted on validation-normal scores; gives the F1 decision threshold.

  Returns:
    A dict with auroc, average_precision, f1, precision, recall (at the calibrated
    threshold), threshold, mean_score_normal, mean_score_abnormal, num_normal and
    num_abnormal.
  """
  labels, scores = _check_inputs(labels, scores)
  result = {
    'auroc': auroc(labels, scores),
    'average_precision': average_precision(labels, scores),
    **f1_at_threshold(labels, scores, calibration.threshold),
    'threshold': float(calibration.threshold),
    'mean_score_normal': float(scores[labels == 0].mean()),
    'mean_score_abnormal': float(scores[labels == 1].mean()),
    'num_normal': int(np.sum(labels == 0)),
    'num_abnormal': int(np.sum(labels == 1)),
  }
  return result
