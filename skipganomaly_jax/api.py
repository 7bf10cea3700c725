"""Loading a trained run, and the `eval` / `score` modes of main.py.

params, config, calibration = skipganomaly_jax.load('runs/demo')
scores = skipganomaly_jax.score_fn(params, images)
"""

import os

import jax
import ml_collections
import numpy as np

from skipganomaly_jax import checkpointing, input_pipeline, localisation, metrics, outputs, overlays
from skipganomaly_jax import train_step as ts
from skipganomaly_jax.scoring import score_details, scoring_variables


def _step(ckpt: checkpointing.Checkpointer, which) -> int:
  if which in (None, 'latest'):
    step = ckpt.latest_step()
  elif which == 'best':
    step = ckpt.best_step()
  else:
    step = int(which)
  if step is None:
    raise checkpointing.CheckpointError(
      f'no {which or "latest"} checkpoint in {ckpt.directory}: train first with '
      f'`python main.py --config=... --workdir={os.path.dirname(ckpt.directory)}`.'
    )
  return step


def _local_target(abstract):
  """Shapes and dtypes of `abstract`, placed on this process's first device.

  A checkpoint keeps the shardings of the run that saved it (e.g. replicated over the 8
  devices of 2 hosts); without explicit target shardings Orbax refuses to restore it on
  another topology ("Topology mismatch"). Scoring wants the arrays on one local device.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def load(workdir: str, which='latest'):
  """Loads a trained model for scoring.

  Args:
    workdir: the run's workdir (the one given to main.py).
    which: 'latest', 'best' (lowest mean validation-normal score) or a step number.

  Returns:
    (params, config, calibration): the `score_fn` variables of both networks (with the
    'knn_bank' of training codes when the run used the latent k-NN score), the run's
    ConfigDict, and its `metrics.Calibration` (None if the run was preempted before its
    first evaluation).

  Raises:
    checkpointing.CheckpointError: no checkpoint, or a corrupt one (names the path).
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(
      f'no checkpoints folder {directory}: is {workdir!r} the workdir of a trained run?'
    )
  with checkpointing.Checkpointer(directory) as ckpt:
    step = _step(ckpt, which)
    stored = ckpt.restore_meta(step)
    config = ml_collections.ConfigDict(stored['config'])
    g, d = jax.eval_shape(lambda: ts.create_train_states(config, jax.random.key(0)))
    target = {'g': g, 'd': d}
    if stored.get('knn_bank_shape'):  # Runs scored with the latent k-NN score.
      target['knn_bank'] = jax.ShapeDtypeStruct(tuple(stored['knn_bank_shape']), np.float32)
    state, meta = ckpt.restore(step, _local_target(target))
  calibration = meta.get('calibration')
  calibration = calibration and metrics.Calibration.from_dict(calibration)
  variables = scoring_variables(state['g'], state['d'], state.get('knn_bank'))
  return variables, config, calibration


def evaluate_checkpoint(workdir: str, which='latest') -> dict:
  """Re-evaluates a checkpoint on its test set and rewrites the workdir's outputs."""
  params, config, calibration = load(workdir, which)
  splits = input_pipeline.load_splits(config)
  test = score_details(params, splits.test)
  scores = np.asarray(test['score'])
  loc = None  # Localisation (issue 12): map scores, pixel AUROC and PRO when masks exist.
  if localisation.needed(config, splits):
    loc = localisation.evaluate(config, params, splits)
    scores = scores if loc.test_scores is None else loc.test_scores
  if calibration is None:
    val = loc.val_scores if loc and loc.val_scores is not None else None
    if val is None:
      val = np.asarray(score_details(params, splits.val)['score'])
    calibration = metrics.Calibration.fit(val, config.threshold_percentile)
  report = metrics.evaluate(splits.test_labels, scores, calibration)
  report.update(loc.report if loc else {}, score_kind=config.score_kind)
  report['paper_score_auroc'] = metrics.auroc(splits.test_labels, np.asarray(test['paper_score']))
  report['checkpoint'] = which
  outputs.write_all(workdir, splits, params, scores, [report], calibration)
  overlays.write_overlays(workdir, config, params, splits)
  return report


def score_path(workdir: str, images_path: str, write_maps: bool = False, which='latest'):
  """Scores image files (a file or a folder) with the stored calibration.

  Writes `workdir/scores.csv` (path, score, normalised_score, anomalous) and, on
  request, anomaly-map PNGs under `workdir/anomaly_maps/`.

  Returns:
    The CSV path.
  """
  params, config, calibration = load(workdir, which)
  if calibration is None:
    raise checkpointing.CheckpointError(
      f'the checkpoint in {workdir} has no calibration (preempted before its first '
      'evaluation): train at least one epoch.'
    )
  images, paths = input_pipeline.load_images(images_path, config.isize, config.nc)
  details = score_details(params, images, return_maps=write_maps)
  if config.score_kind in localisation.MAP_SCORE_KINDS:  # Localisation (issue 12).
    details = localisation.score_images(config, params, images)
  csv_path = os.path.join(workdir, 'scores.csv')
  outputs.write_scores_csv(csv_path, paths, np.asarray(details['score']), calibration)
  if write_maps:
    outputs.write_anomaly_maps(
      os.path.join(workdir, 'anomaly_maps'), paths, np.asarray(details['anomaly_map'])
    )
  return csv_path
