"""What a run leaves in its workdir: metrics.json, ROC and histogram PNGs, a
reconstruction grid, and the CSV of `--mode=score`. Process 0 only."""

import csv
import json
import os

import numpy as np
from PIL import Image

from skipganomaly_jax.config import ScoreSpec
from skipganomaly_jax.data.images import to_float
from skipganomaly_jax.reporting import plots
from skipganomaly_jax.scoring import metrics
from skipganomaly_jax.scoring.scores import KNN_K, score_details

PROTOCOL_NOTE = (
  'ours: BatchNorm in eval mode (running statistics), model of the last epoch, '
  'threshold and min-max calibration from held-out validation normals; no selection '
  "on the test set. reference_protocol_auroc (if present) is the reference code's "
  'evaluation: train-mode BatchNorm on normal-first test batches of 64.'
)

SCORE_NOTE = (
  'paper_score_auroc: the paper score (lam * rec + (1 - lam) * lat, lam = '
  "config.score_lambda); latent_knn_auroc: cosine distance of G's bottleneck code to its "
  f'{KNN_K} nearest training-normal codes; both always. auroc, average_precision, f1, '
  'threshold: of score_kind\'s score. History entries with a "checkpoint" key are later '
  '--mode=eval evaluations.'
)


def _summary(history: list, calibration, abnormal_name: str, score: ScoreSpec) -> dict:
  """The content of metrics.json."""
  return {
    'final': history[-1],
    'history': history,
    'calibration': calibration.to_dict(),
    'abnormal_class': abnormal_name,
    'protocol': PROTOCOL_NOTE,
    'score_kind': score.kind,
    'score_lambda': score.lam,
    'eval_protocol': score.eval_protocol,
    'score': SCORE_NOTE,
  }


def write_all(
  workdir: str,
  splits,
  variables,
  test_scores: np.ndarray,
  history: list,
  calibration: metrics.Calibration,
  score: ScoreSpec,
) -> dict:
  """Writes metrics.json, roc.png, score_histogram.png and reconstructions.png.

  Args:
    workdir: the run's directory.
    splits: the run's `DataSplits`.
    variables: the scoring variables of the evaluated model.
    test_scores: its scores of `splits.test` (from the run's own scorer).
    history: the evaluation reports; the last one is 'final'.
    calibration: the model's calibration.
    score: the run's score spec (its kind, lambda and eval_protocol are recorded).

  Returns:
    The paths written, by name.
  """
  os.makedirs(workdir, exist_ok=True)
  labels = splits.test_labels
  paths = {
    name: os.path.join(workdir, name)
    for name in ('metrics.json', 'roc.png', 'score_histogram.png', 'reconstructions.png')
  }
  final = history[-1]
  with open(paths['metrics.json'], 'w') as f:
    json.dump(_summary(history, calibration, splits.abnormal_name, score), f, indent=2)
  title = f'abnormal: {splits.abnormal_name}, AUROC {final["auroc"]:.3f}'
  plots.save_roc_curve(paths['roc.png'], labels, test_scores, title)
  plots.save_score_histogram(
    paths['score_histogram.png'], labels, test_scores, calibration.threshold, title
  )
  pick = plots.pick_examples(labels)
  # Reconstructions and maps only: the scores shown are the run's own (its lambda, dtype).
  details = score_details(variables, splits.test[pick], return_maps=True)
  plots.save_reconstruction_grid(
    paths['reconstructions.png'],
    to_float(splits.test[pick]),
    np.asarray(details['reconstruction']),
    np.asarray(details['anomaly_map']),
    labels[pick],
    np.asarray(test_scores)[pick],
  )
  return paths


def write_scores_csv(path: str, image_paths, scores, calibration: metrics.Calibration) -> None:
  """CSV of path, raw score, calibrated (min-max) score and the anomalous decision."""
  normalised = calibration.normalise(scores)
  flags = calibration.is_anomalous(scores)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'score', 'normalised_score', 'anomalous'])
    for row in zip(image_paths, scores, normalised, flags, strict=True):
      writer.writerow([row[0], f'{row[1]:.6g}', f'{row[2]:.6g}', 'yes' if row[3] else 'no'])


def write_anomaly_maps(folder: str, image_paths, maps: np.ndarray) -> list[str]:
  """One grayscale PNG per image (brighter = more anomalous, scaled per batch)."""
  os.makedirs(folder, exist_ok=True)
  scale = max(float(np.max(maps)), 1e-12)
  written = []
  for i, (src, amap) in enumerate(zip(image_paths, maps, strict=True)):
    name = f'{i:05d}_{os.path.splitext(os.path.basename(src))[0]}_map.png'
    out = os.path.join(folder, name)
    Image.fromarray(np.uint8(np.clip(amap / scale, 0, 1) * 255)).save(out)
    written.append(out)
  return written
