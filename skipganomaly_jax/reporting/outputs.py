"""What a run leaves in its workdir: metrics.json, ROC and histogram PNGs, a
reconstruction grid, and the CSV of `--mode=score`. Process 0 only."""

import csv
import json
import os

import numpy as np
from PIL import Image, PngImagePlugin

from skipganomaly_jax.config import LocalisationSpec, ScoreSpec
from skipganomaly_jax.data import mvtec
from skipganomaly_jax.data.images import to_float
from skipganomaly_jax.reporting import overlays, plots
from skipganomaly_jax.scoring import localisation, metrics
from skipganomaly_jax.scoring.scores import KNN_K, score_details

PROTOCOL_NOTE = (
  'ours: BatchNorm in eval mode (running statistics), model of the last epoch, '
  'threshold and min-max calibration from held-out validation normals; no selection '
  "on the test set. reference_protocol_auroc (if present) is the reference code's "
  'evaluation: train-mode BatchNorm on normal-first test batches of 64.'
)

# How every output names a score kind: the run's own (config.score_kind) and the others.
SCORE_NAMES = {
  'paper': 'paper score',
  'latent_knn': 'latent k-NN',
  'map_max': 'map_max',
  'map_topk': 'map_topk',
}
# The report key of each score's AUROC (an evaluation reports every score it computed).
AUROC_KEYS = {
  'paper': 'paper_score_auroc',
  'latent_knn': 'latent_knn_auroc',
  'map_max': 'map_max_auroc',
  'map_topk': 'map_topk_auroc',
}
# What an evaluation writes in the workdir (write_all; localisation.png: overlays.py),
# and what training adds; `listing` names those present, in this order.
EVALUATION_FILES = ('metrics.json', 'roc.png', 'score_histogram.png', 'reconstructions.png')
TRAINING_OUTPUTS = ('metrics.jsonl', 'tensorboard', 'checkpoints')
SCORES_CSV = 'scores.csv'  # --mode=score's table and maps folder.
MAPS_FOLDER = 'anomaly_maps'
SCORES_CSV_COLUMNS = ('path', 'score', 'normalised_score', 'anomalous', 'score_kind')

SCORE_NOTE = (
  'paper_score_auroc: the paper score (lam * rec + (1 - lam) * lat, lam = '
  "config.score_lambda); latent_knn_auroc: cosine distance of G's bottleneck code to its "
  f'{KNN_K} nearest training-normal codes; both always. auroc, average_precision, f1, '
  "threshold: of score_kind's score (also map_max_auroc / map_topk_auroc when maps are "
  'computed). History entries with a "checkpoint" key are later --mode=eval evaluations. '
  f'scores.csv (--mode=score): normalised_score = {metrics.NORMALISED_SCORE}.'
)


def score_name(kind: str) -> str:
  """How outputs name a score kind: 'paper score', 'latent k-NN', 'map_topk', ..."""
  return SCORE_NAMES.get(kind, kind)


def summary(report: dict, validation: bool = False) -> str:
  """One line about an evaluation report: the run's own score first, by name.

  E.g. "map_topk AUROC 0.8500 (the run's score; AUROC of the other scores: paper score
  0.8989, latent k-NN 0.9794, map_max 0.8333; map_topk: average precision 0.8, F1 0.6 at
  threshold 0.0123; pixel AUROC 0.9210, PRO 0.8210)".

  Args:
    report: an evaluation report (with 'score_kind', 'auroc', 'average_precision', 'f1'
      and 'threshold' of that score, and the AUROCs of the others it computed).
    validation: also give the mean score of the validation normals ('val_score').
  """
  kind = report['score_kind']
  name = score_name(kind)
  others = [
    f'{score_name(k)} {report[key]:.4f}'
    for k, key in AUROC_KEYS.items()
    if k != kind and key in report
  ]
  parts = ["the run's score"]
  if others:
    parts.append('AUROC of the other scores: ' + ', '.join(others))
  own = (
    f'{name}: average precision {report["average_precision"]:.4f}, F1 {report["f1"]:.4f} '
    f'at threshold {report["threshold"]:.4g}'
  )
  if validation and 'val_score' in report:
    own += f', mean of the validation normals {report["val_score"]:.4g}'
  parts.append(own)
  if 'reference_protocol_auroc' in report:
    parts.append(
      f"paper score's AUROC by the reference protocol {report['reference_protocol_auroc']:.4f}"
    )
  if 'pixel_auroc' in report:
    parts.append(f'pixel AUROC {report["pixel_auroc"]:.4f}, PRO {report["pro"]:.4f}')
  return f'{name} AUROC {report["auroc"]:.4f} ({"; ".join(parts)})'


def listing(workdir: str, names) -> list[str]:
  """The `names` present in workdir, in order; folders end in '/'."""
  found = []
  for name in names:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      found.append(name + '/')
    elif os.path.isfile(path):
      found.append(name)
  return found


def evaluation_outputs(workdir: str) -> list[str]:
  """What an evaluation (training's last, or --mode=eval) wrote in workdir."""
  return listing(workdir, (*EVALUATION_FILES, overlays.FILENAME))


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
  localisation_spec: LocalisationSpec | None = None,
  map_scale: localisation.MapScale | None = None,
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
    localisation_spec: the run's localisation settings: reconstructions.png's maps are
      its localisation maps (None: the defaults).
    map_scale: those maps' `localisation.MapScale` (None: from `splits.val`).

  Returns:
    The paths written, by name.
  """
  os.makedirs(workdir, exist_ok=True)
  labels = splits.test_labels
  paths = {name: os.path.join(workdir, name) for name in EVALUATION_FILES}
  final = history[-1]
  with open(paths['metrics.json'], 'w') as f:
    json.dump(_summary(history, calibration, splits.abnormal_name, score), f, indent=2)
  name = score_name(score.kind)
  title = f"{name} (the run's score), AUROC {final['auroc']:.3f}\nabnormal: {splits.abnormal_name}"
  plots.save_roc_curve(paths['roc.png'], labels, test_scores, title, score_name=name)
  plots.save_score_histogram(
    paths['score_histogram.png'],
    labels,
    test_scores,
    calibration.threshold,
    title,
    score_name=name,
  )
  write_reconstructions(
    paths['reconstructions.png'],
    splits,
    variables,
    test_scores,
    calibration,
    localisation_spec or LocalisationSpec(),
    map_scale,
    score_name=name,
  )
  return paths


def write_reconstructions(
  path, splits, variables, test_scores, calibration, settings, scale=None, score_name=None
) -> None:
  """reconstructions.png: the first normal test images, then abnormal ones covering every
  defect kind (folder) present, each titled with the run's score and its decision;
  rows: input, reconstruction, and the anomaly map as localisation.png and --maps show it
  (`localisation.display_maps`: in units of the normal level, scale [0, DISPLAY_MAX])."""
  kinds = mvtec.defect_kinds(splits)
  pick = plots.pick_examples(splits.test_labels, kinds=kinds)
  scale = scale or localisation.map_scale(variables, splits.val, settings)
  # Reconstructions only: the scores shown are the run's own (its lambda, dtype, kind).
  details = score_details(variables, splits.test[pick], return_maps=True)
  plots.save_reconstruction_grid(
    path,
    to_float(splits.test[pick]),
    np.asarray(details['reconstruction']),
    localisation.display_maps(variables, splits.test[pick], settings, scale),
    splits.test_labels[pick],
    np.asarray(test_scores)[pick],
    len(pick),
    kinds=None if kinds is None else kinds[pick],
    threshold=calibration.threshold,
    vmax=localisation.DISPLAY_MAX,
    map_label=overlays.MAP_LABEL,
    score_name=score_name,
  )


def write_scores_csv(
  path: str, image_paths, scores, calibration: metrics.Calibration, score_kind: str
) -> None:
  """CSV of path, raw score, normalised score, the anomalous decision and the score kind.

  normalised_score = score / threshold (`metrics.NORMALISED_SCORE`): 1.0 is the
  threshold, and anomalous is 'yes' exactly when the score is above it.
  """
  normalised = calibration.normalise(scores)
  flags = calibration.is_anomalous(scores)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(SCORES_CSV_COLUMNS)
    for row in zip(image_paths, scores, normalised, flags, strict=True):
      anomalous = 'yes' if row[3] else 'no'
      writer.writerow([row[0], f'{row[1]:.6g}', f'{row[2]:.6g}', anomalous, score_kind])


MAP_ENCODING = (
  f'grey level g (0-255) = round(255 * min(map, {localisation.DISPLAY_MAX:g}) / '
  f'{localisation.DISPLAY_MAX:g}): map = g / 255 * {localisation.DISPLAY_MAX:g} in units '
  f'of the normal level ({localisation.UNIT_NAME}); 255 = {localisation.DISPLAY_MAX:g} '
  'or more'
)


def write_anomaly_maps(
  folder: str,
  image_paths,
  images: np.ndarray,
  maps: np.ndarray,
  settings: LocalisationSpec,
  scale: localisation.MapScale,
  scores=None,
  calibration: metrics.Calibration | None = None,
) -> list[str]:
  """Two PNGs per image, on one fixed scale that no other image changes.

  `NNNNN_<name>_map.png`: the map, grey, isize x isize, grey level = MAP_ENCODING.
  `NNNNN_<name>_overlay.png`: the image as the model saw it (resized, cropped) with the
  map blended on it as colour, and a legend (`overlays.overlay_image`).
  Both carry PNG text metadata: 'quantity', 'definition' (with the run's numbers),
  'unit' (the raw map value shown as 1), 'display_max', 'encoding' (map PNGs), 'map_max'
  (this image's, not clipped), 'source' (the image file) and, with scores, 'score',
  'threshold' and 'anomalous'.

  Args:
    folder: output folder.
    image_paths: the N source files (names the outputs).
    images: uint8 (N, isize, isize, nc): the images as scored.
    maps: (N, isize, isize) maps in units of the normal level (`display_maps`).
    settings: the run's localisation settings (described in the metadata).
    scale: the maps' `localisation.MapScale`.
    scores: (N,) the run's scores of the images, or None.
    calibration: the run's calibration (its threshold decides 'anomalous').

  Returns:
    The paths written: map, overlay, map, overlay, ...
  """
  os.makedirs(folder, exist_ok=True)
  # The PNGs of an earlier --maps run (another folder of images) would otherwise stay
  # beside these and read as theirs; only files of our own naming are removed.
  for name in os.listdir(folder):
    if name.endswith(('_map.png', '_overlay.png')) and name[:5].isdigit():
      os.remove(os.path.join(folder, name))
  top = localisation.DISPLAY_MAX
  common = {
    'quantity': f'anomaly map (1 = {localisation.UNIT_NAME})',
    'definition': localisation.describe(settings, scale),
    'unit': f'{scale.unit:.6g}',
    'display_max': f'{top:g}',
    'software': 'skipganomaly_jax',
  }
  written = []
  for i, (src, image, amap) in enumerate(zip(image_paths, images, maps, strict=True)):
    stem = f'{i:05d}_{os.path.splitext(os.path.basename(src))[0]}'
    text = common | {'source': os.fspath(src), 'map_max': f'{float(np.max(amap)):.4g}'}
    if scores is not None:
      text['score'] = f'{float(scores[i]):.6g}'
      if calibration is not None:
        text['threshold'] = f'{calibration.threshold:.6g}'
        text['anomalous'] = 'yes' if float(scores[i]) > calibration.threshold else 'no'
    grey = np.uint8(np.rint(255.0 * np.clip(np.asarray(amap, np.float64), 0.0, top) / top))
    written.append(
      _save_png(
        Image.fromarray(grey, 'L'), folder, f'{stem}_map.png', text | {'encoding': MAP_ENCODING}
      )
    )
    overlay = overlays.overlay_image(image, amap, top)
    written.append(_save_png(overlay, folder, f'{stem}_overlay.png', text))
  return written


def _save_png(image: Image.Image, folder: str, name: str, text: dict) -> str:
  info = PngImagePlugin.PngInfo()
  for key, value in text.items():
    info.add_text(key, value)
  path = os.path.join(folder, name)
  image.save(path, pnginfo=info)
  return path
