"""Tests of skipganomaly_jax.scoring.metrics against scikit-learn on fresh random inputs."""

import dataclasses
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from skipganomaly_jax.scoring import metrics


def _random_case(rng: np.random.Generator, kind: str):
  """Returns (labels, scores) with both classes present; `kind` controls ties."""
  n = int(rng.integers(2, 300))
  labels = rng.integers(0, 2, size=n)
  labels[rng.choice(n, size=2, replace=False)] = [0, 1]
  if kind == 'continuous':
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
  elif kind == 'ties':
    scores = np.round(rng.normal(size=n) + labels, 1)
  elif kind == 'few_values':
    scores = rng.integers(0, 3, size=n).astype(np.float64) * 0.25
  else:  # all equal
    scores = np.full(n, 0.7)
  return labels, scores


KINDS = ['continuous', 'ties', 'few_values', 'equal']


@pytest.mark.parametrize('kind', KINDS)
def test_ranking_metrics_match_sklearn(kind, rng):
  for _ in range(25):
    labels, scores = _random_case(rng, kind)
    np.testing.assert_allclose(
      metrics.auroc(labels, scores), skm.roc_auc_score(labels, scores), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
      metrics.average_precision(labels, scores),
      skm.average_precision_score(labels, scores),
      rtol=1e-12,
      atol=1e-12,
    )
    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr, sk_thr)


def test_all_equal_scores_give_half():
  assert metrics.auroc([0, 1, 0, 1, 1], [3.0] * 5) == 0.5


@pytest.mark.parametrize('kind', KINDS)
def test_f1_matches_sklearn(kind, rng):
  for _ in range(25):
    labels, scores = _random_case(rng, kind)
    threshold = float(rng.choice(scores)) if rng.random() < 0.5 else float(rng.normal())
    got = metrics.f1_at_threshold(labels, scores, threshold)
    predicted = (scores > threshold).astype(int)
    kw = {'zero_division': 0}
    assert got['f1'] == pytest.approx(skm.f1_score(labels, predicted, **kw), abs=1e-12)
    assert got['precision'] == pytest.approx(
      skm.precision_score(labels, predicted, **kw), abs=1e-12
    )
    assert got['recall'] == pytest.approx(skm.recall_score(labels, predicted, **kw), abs=1e-12)


def test_calibration_fit_and_round_trip(rng):
  val = rng.gamma(2.0, size=200)
  cal = metrics.Calibration.fit(val, 95)
  assert cal.score_min == val.min() and cal.score_max == val.max()
  assert cal.threshold == pytest.approx(np.percentile(val, 95))
  assert cal.num_val == 200 and cal.percentile == 95.0
  assert np.mean(cal.is_anomalous(val)) == pytest.approx(0.05, abs=0.01)
  d = json.loads(json.dumps(cal.to_dict()))
  assert metrics.Calibration.from_dict(d) == cal
  with pytest.raises(ValueError, match='lacks'):
    metrics.Calibration.from_dict({'score_min': 0.0})
  with pytest.raises(dataclasses.FrozenInstanceError):
    cal.threshold = 1.0  # type: ignore[misc]


def test_normalise_is_monotone_and_puts_the_threshold_at_one(rng):
  val = rng.uniform(1.0, 3.0, size=50)
  cal = metrics.Calibration.fit(val, 90)
  assert cal.normalise([cal.threshold]).item() == 1.0  # scores.csv's normalised_score.
  test = rng.uniform(0.0, 5.0, size=100)
  np.testing.assert_array_equal(np.argsort(cal.normalise(test)), np.argsort(test))
  # A single score is scorable, and test data never changes the map.
  assert cal.normalise(np.array([cal.score_max * 2])).item() > 1.0
  labels = (test > 2.5).astype(int)
  labels[:2] = [0, 1]
  assert metrics.auroc(labels, cal.normalise(test)) == pytest.approx(metrics.auroc(labels, test))
  flat = metrics.Calibration.fit([2.0, 2.0], 50)
  np.testing.assert_allclose(flat.normalise([2.0, 3.0]), [1.0, 1.5])


def test_evaluate(rng):
  labels, scores = _random_case(rng, 'continuous')
  cal = metrics.Calibration.fit(rng.normal(size=100), 95)
  result = metrics.evaluate(labels, scores, cal)
  json.dumps(result)  # JSON-safe.
  assert result['auroc'] == pytest.approx(skm.roc_auc_score(labels, scores))
  assert result['average_precision'] == pytest.approx(skm.average_precision_score(labels, scores))
  predicted = (scores > cal.threshold).astype(int)
  assert result['f1'] == pytest.approx(skm.f1_score(labels, predicted, zero_division=0))
  assert result['num_normal'] == int(np.sum(labels == 0))
  assert result['num_abnormal'] == int(np.sum(labels == 1))
  assert result['mean_score_normal'] == pytest.approx(scores[labels == 0].mean())
  assert result['mean_score_abnormal'] == pytest.approx(scores[labels == 1].mean())
  assert result['threshold'] == cal.threshold


@pytest.mark.parametrize(
  'fn', [metrics.auroc, metrics.average_precision, metrics.roc_curve, 'f1', 'evaluate']
)
def test_input_errors(fn):
  cal = metrics.Calibration.fit([0.0, 1.0], 50)
  if fn == 'f1':
    fn = lambda y, s: metrics.f1_at_threshold(y, s, 0.5)
  elif fn == 'evaluate':
    fn = lambda y, s: metrics.evaluate(y, s, cal)
  with pytest.raises(ValueError, match='one class'):
    fn([0, 0, 0], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match='differ in length'):
    fn([0, 1, 0], [0.1, 0.2])
  with pytest.raises(ValueError, match='NaN'):
    fn([0, 1, 0], [0.1, np.nan, 0.3])
  with pytest.raises(ValueError, match='0 \\(normal\\) or 1'):
    fn([0, 2, 1], [0.1, 0.2, 0.3])


def test_calibration_errors():
  with pytest.raises(ValueError, match='NaN'):
    metrics.Calibration.fit([0.1, np.nan], 95)
  with pytest.raises(ValueError, match='empty'):
    metrics.Calibration.fit([], 95)
  with pytest.raises(ValueError, match='percentile'):
    metrics.Calibration.fit([0.1, 0.2], 101)
