"""The `eval` and `score` modes of main.py, on a trained run (`trained_run.restore`).

--mode=eval re-evaluates a checkpoint the run's way and adds the report to its outputs;
--mode=score scores image files with the run's own score and calibration, reading no
dataset. Both take the run's stored config; `command_line_config` decides which values
of the command line they honour (where the data lives, for eval) and refuses the rest.
"""

import dataclasses
import json
import os

import numpy as np

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.deploy.trained_run import map_scale, restore, run_params, stored_config
from skipganomaly_jax.reporting import outputs, overlays
from skipganomaly_jax.scoring import evaluation, localisation
from skipganomaly_jax.scoring.scores import score_details
from skipganomaly_jax.training import checkpointing


def _previous_history(workdir: str, stored: list) -> list:
  """metrics.json's history if readable (it has later evaluations), else the stored one."""
  path = os.path.join(workdir, 'metrics.json')
  try:
    with open(path) as f:
      history = json.load(f)['history']
    if isinstance(history, list):
      return history
  except (OSError, ValueError, KeyError, TypeError):
    pass
  return list(stored)


# The config fields that each mode takes from the command line instead of the run's
# stored config: for eval, where the run's data lives (a moved copy of the same data).
# Nothing else: the networks, scores and calibration belong to the stored config.
HONOURED_FIELDS = {
  'eval': ('dataset.root', 'dataset.path', 'dataset.data_dir'),
  'score': (),
  'export': (),
}
_WHY_NOT = {
  'eval': "only where the run's data lives can change",
  'score': (
    'nothing can change: it reads no dataset (the checkpoint holds the networks, the '
    "calibration and the maps' scale it needs)"
  ),
  'export': 'nothing can change: the detector is exported from the checkpoint as trained',
}


def command_line_config(mode: str, workdir: str, which, requested: dict) -> dict:
  """Checks the config values a command line sets in `mode` against the run's config.

  eval, score and export use the run's stored config; a value from the command line that
  differs from it is honoured where `mode` can take it (HONOURED_FIELDS) and refused
  otherwise, never ignored.

  Args:
    mode: 'eval', 'score' or 'export'.
    workdir: the run's workdir.
    which: the checkpoint selector of the command line.
    requested: {field: (value, how the command line set it)}, e.g. {'dataset.root':
      ('/data/x', '--config.dataset.root=/data/x')}.

  Returns:
    {field: value}: the honoured values that differ from the stored ones.

  Raises:
    ValueError: a differing value `mode` cannot take; names each such flag, its value,
      the run's value and what the mode uses instead.
  """
  config, path = stored_config(workdir, which)
  stored = config_lib.values(config)
  changed = {name: v for name, v in requested.items() if v[0] != stored[name]}
  honoured = HONOURED_FIELDS[mode]
  refused = [
    f"{how} (the run's value: {stored[name]!r})"
    for name, (_, how) in changed.items()
    if name not in honoured
  ]
  if refused:
    can = _WHY_NOT[mode]
    if honoured:
      can += ' (' + ', '.join(f'--config.{name}' for name in honoured) + ')'
    raise ValueError(
      f"--mode={mode} uses the run's stored config ({path}), not the command line's: "
      f'refused {"; ".join(refused)}. In --mode={mode} {can}. Drop the refused flag(s); to '
      'change them, train a new run.'
    )
  return {name: value for name, (value, _) in changed.items()}


def evaluate_checkpoint(workdir: str, which='latest', data: dict | None = None) -> dict:
  """Re-evaluates a checkpoint the run's way and adds the result to its outputs.

  The report (with 'checkpoint' and 'step') is appended to metrics.json's history, which
  keeps the training history; the ROC, histogram and reconstruction plots are redrawn.
  A checkpoint saved without its maps' scale (older versions) gets it stored, so that
  --mode=score can then read it instead of the data.

  Args:
    workdir: the run's workdir.
    which: 'latest', 'best' or a step.
    data: where the run's data lives now, if it moved: {'dataset.root': ...} (the fields
      of HONOURED_FIELDS['eval']); None: where its stored config says.

  Returns:
    The new report.
  """
  model = restore(workdir, which)
  specs = model.specs
  if data:
    moved = {name.split('.', 1)[1]: value for name, value in data.items()}
    specs = dataclasses.replace(specs, data=dataclasses.replace(specs.data, **moved))
  try:
    splits = input_pipeline.load_splits(specs.data)
  except FileNotFoundError as e:
    flags = ', '.join(f'--config.{name}=...' for name in HONOURED_FIELDS['eval'])
    raise FileNotFoundError(
      f"--mode=eval reads the run's data where its stored config says (from "
      f'{model.path}) unless told otherwise: {e} If the data moved, give its new place '
      f'({flags}).'
    ) from e
  variables = model.params
  if 'knn_bank' not in variables:  # A paper-score run: a bank to report latent k-NN too.
    bank = evaluation.knn_bank(model.scorer, variables, splits.train, specs.score)
    variables = {**variables, 'knn_bank': bank}
  report, calibration, test_scores = evaluation.evaluate(
    model.scorer, variables, splits, specs.score, specs.localisation, model.calibration
  )
  epoch = model.history[-1].get('epoch') if model.history else None
  report = {**report, 'checkpoint': str(which), 'epoch': epoch, 'step': model.step}
  history = _previous_history(workdir, model.history) + [report]
  settings = specs.localisation
  scale = model.map_scale
  if scale is None:  # Saved by an older version: computed now, stored for --mode=score.
    scale = localisation.map_scale(model.params, splits.val, settings)
    with checkpointing.Checkpointer(os.path.dirname(model.path)) as ckpt:
      ckpt.update_meta(model.step, {'map_scale': scale.to_dict()})
  outputs.write_all(
    workdir, splits, model.params, test_scores, history, calibration, specs.score, settings, scale
  )
  overlays.write_overlays(workdir, settings, model.params, splits, test_scores, calibration, scale)
  return report


def score_path(workdir: str, images_path: str, write_maps: bool = False, which='latest'):
  """Scores image files (a file or a folder) the run's way, with its calibration.

  The scores are `score_fn`'s on `load`'s params (the run's own score: its kind,
  score_lambda, dtype and map settings), so the 'anomalous' column uses the threshold
  fitted to that very score. Writes
  `workdir/scores.csv` (path, score, normalised_score = score / threshold, anomalous,
  score_kind) and, on request, anomaly-map PNGs under `workdir/anomaly_maps/`. Reads no
  dataset: what the scores need beyond the networks and the calibration (the maps'
  scale) is stored with the checkpoint.

  Returns:
    The CSV path.
  """
  model = restore(workdir, which)
  if model.calibration is None:
    raise checkpointing.CheckpointError(
      f'the checkpoint in {workdir} has no calibration: its weights were imported without '
      'their dataset. Re-import with the dataset available (python -m '
      'skipganomaly_jax.import_reference ... --config=... with the data in place), or score '
      'with skipganomaly_jax.score_fn and your own threshold.'
    )
  specs = model.specs
  images, paths = input_pipeline.load_images(images_path, specs.model.isize, specs.model.nc)
  # The one definition of the run's score ('rec+d' units: stored with the checkpoint).
  scores = np.asarray(score_details(run_params(model), images)['score'])
  csv_path = os.path.join(workdir, outputs.SCORES_CSV)
  outputs.write_scores_csv(csv_path, paths, scores, model.calibration, specs.score.kind)
  if write_maps:  # The run's localisation maps, in units of the normal level.
    settings, scale = specs.localisation, map_scale(model)
    maps = localisation.display_maps(model.params, images, settings, scale)
    outputs.write_anomaly_maps(
      os.path.join(workdir, outputs.MAPS_FOLDER),
      paths,
      images,
      maps,
      settings,
      scale,
      scores,
      model.calibration,
    )
  return csv_path
