"""Loading a trained run, and the `eval` / `score` modes of main.py.

params, config, calibration = skipganomaly_jax.load('runs/demo')
scores = skipganomaly_jax.score_fn(params, images)

Everything is read from the run's checkpoint: the networks, the k-NN bank, the
calibration and the run's config, checked and turned into its specs, whose score_lambda,
dtype, eval_batch_size and eval_protocol the `eval` and `score` modes use (`restore`).
Only checkpoints whose bank and calibration belong to their networks are used: a
checkpoint saved on preemption (networks and data position only) is skipped by 'latest'
and refused by step number.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.parallel import make_mesh
from skipganomaly_jax.reporting import outputs, overlays
from skipganomaly_jax.scoring import evaluation, localisation, metrics
from skipganomaly_jax.scoring.scores import score_details
from skipganomaly_jax.training import checkpointing


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """One evaluated checkpoint of a run, and what scoring it the run's way needs.

  Attributes:
    params: the `score_fn` variables (with 'knn_bank' for the latent k-NN score), on
      this process's first device.
    config: the run's ConfigDict (fields under their current names, all present).
    specs: its checked specs (what the lower layers take).
    calibration: the calibration fitted on the validation normals for these networks.
    step: the checkpoint's training step.
    history: the evaluation reports stored with the checkpoint.
    scorer: the dataset scorer of the run's specs (its lambda, dtype, eval batch).
  """

  params: dict
  config: ml_collections.ConfigDict
  specs: config_lib.RunSpecs
  calibration: metrics.Calibration | None  # None only for weights imported uncalibrated.
  step: int
  history: list
  scorer: evaluation.DatasetScorer


def is_evaluated(meta: dict) -> bool:
  """Whether a checkpoint's bank and calibration belong to its networks.

  Training saves them only with the end-of-epoch checkpoint that follows an evaluation;
  a preemption checkpoint has no calibration (older versions stored the previous
  epoch's in a mid-epoch one: step_in_epoch > 0). Imported reference weights count as
  evaluated: any bank or calibration they carry was computed for them
  (import_reference.py), and they may carry none.
  """
  if meta.get('imported'):
    return True
  return meta.get('calibration') is not None and meta['data_iterator']['step_in_epoch'] == 0


def _select(ckpt: checkpointing.Checkpointer, which) -> int:
  """The step of `which` ('latest', 'best' or a step) among the evaluated checkpoints."""
  which = config_lib.checkpoint_selector(which)
  steps = ckpt.all_steps()
  evaluated = [s for s in steps if is_evaluated(ckpt.restore_meta(s))]
  retrain = f'python main.py --config=... --workdir={os.path.dirname(ckpt.directory)}'
  if not evaluated:
    state = f'only preemption checkpoints (steps {steps})' if steps else 'no checkpoint'
    raise checkpointing.CheckpointError(
      f'no evaluated checkpoint in {ckpt.directory} ({state}): train, or resume, at least '
      f'one epoch with `{retrain}`.'
    )
  if which == 'latest':
    return evaluated[-1]
  if which == 'best':
    return ckpt.best_step()
  if which not in steps:
    raise checkpointing.CheckpointError(
      f'no checkpoint {ckpt.step_path(which)}: the evaluated steps are {evaluated}.'
    )
  if which not in evaluated:
    raise checkpointing.CheckpointError(
      f'checkpoint {ckpt.step_path(which)} was saved on preemption: it has no k-NN bank or '
      f'calibration of its own. Use an evaluated step ({evaluated}) or resume training.'
    )
  return which


def _local(abstract):
  """Shapes and dtypes of `abstract`, placed on this process's first device.

  A checkpoint keeps the shardings of the run that saved it (e.g. replicated over the 8
  devices of 2 hosts); without explicit target shardings Orbax refuses to restore it on
  another topology ("Topology mismatch"). Scoring wants the arrays on one local device.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def _variables(net: dict) -> dict:
  """A restored TrainState (a dict of its fields) -> its scoring variables."""
  return {'params': net['params'], 'batch_stats': net['batch_stats']}


def restore(workdir: str, which='latest') -> TrainedModel:
  """The one place that reads a trained run: networks, bank, calibration, config, scorer.

  Args:
    workdir: the run's workdir (the one given to main.py).
    which: 'latest' (the newest evaluated checkpoint), 'best' (lowest mean validation-
      normal score) or a step number.

  Raises:
    checkpointing.CheckpointError: no (evaluated) checkpoint, or a corrupt one.
    ValueError: a bad `which`, or a stored config this version does not understand.
  """
  which = config_lib.checkpoint_selector(which)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(
      f'no checkpoints folder {directory}: is {workdir!r} the workdir of a trained run?'
    )
  with checkpointing.Checkpointer(directory) as ckpt:
    step = _select(ckpt, which)
    config = config_lib.from_stored(ckpt.restore_meta(step)['config'])
    # The stored tree as the target: no optimiser or TrainState class is needed to read it.
    state, meta = ckpt.restore(step, _local(ckpt.abstract_state(step)))
  params = {'generator': _variables(state['g']), 'discriminator': _variables(state['d'])}
  if 'knn_bank' in state:
    params['knn_bank'] = state['knn_bank']
  specs = config_lib.specs(config)
  mesh = make_mesh(jax.local_devices()[:1])
  return TrainedModel(
    params=params,
    config=config,
    specs=specs,
    calibration=meta['calibration'] and metrics.Calibration.from_dict(meta['calibration']),
    step=step,
    history=list(meta.get('history', [])),
    scorer=evaluation.make_scorer(ModelSpec.from_settings(specs.model), specs.score, mesh),
  )


def load(workdir: str, which='latest'):
  """Loads a trained model for scoring.

  Args:
    workdir: the run's workdir (the one given to main.py).
    which: 'latest' (newest evaluated checkpoint), 'best' (lowest mean validation-normal
      score) or a step number.

  Returns:
    (params, config, calibration): the `score_fn` variables of both networks (with the
    'knn_bank' of training codes when the run used the latent k-NN score), the run's
    ConfigDict and its `metrics.Calibration`, all of the same checkpoint. Score with
    `score_fn(params, x, lam=config.score_lambda)` to match the run's paper score.

  Raises:
    checkpointing.CheckpointError: no evaluated checkpoint, or a corrupt one (names the
      path).
  """
  model = restore(workdir, which)
  return model.params, model.config, model.calibration


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


def evaluate_checkpoint(workdir: str, which='latest') -> dict:
  """Re-evaluates a checkpoint the run's way and adds the result to its outputs.

  The report (with 'checkpoint' and 'step') is appended to metrics.json's history, which
  keeps the training history; the ROC, histogram and reconstruction plots are redrawn.

  Returns:
    The new report.
  """
  model = restore(workdir, which)
  specs = model.specs
  splits = input_pipeline.load_splits(specs.data)
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
  outputs.write_all(workdir, splits, model.params, test_scores, history, calibration, specs.score)
  overlays.write_overlays(workdir, specs.localisation, model.params, splits)
  return report


def score_path(workdir: str, images_path: str, write_maps: bool = False, which='latest'):
  """Scores image files (a file or a folder) the run's way, with its calibration.

  The scores come from the run's own scorer (its score_lambda, dtype and evaluation
  batch), so the 'anomalous' column uses the threshold fitted to that very score. Writes
  `workdir/scores.csv` (path, score, normalised_score, anomalous) and, on request,
  anomaly-map PNGs under `workdir/anomaly_maps/`.

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
  local = None  # A map score: the run's smoothed maps and their image scores.
  if specs.score.kind in localisation.MAP_SCORE_KINDS:
    settings = specs.localisation
    # 'rec+d' is in validation-normal units: the run's validation images are read again.
    val = input_pipeline.load_splits(specs.data).val if settings.map == 'rec+d' else None
    local = localisation.score_images(model.params, images, specs.score.kind, settings, val)
  scores = local['score'] if local else model.scorer(model.params, images)['score']
  csv_path = os.path.join(workdir, 'scores.csv')
  outputs.write_scores_csv(csv_path, paths, scores, model.calibration)
  if write_maps:  # (x - G(x))^2 over channels (no lambda in it), or the map score's maps.
    maps = (
      local['anomaly_map']
      if local
      else score_details(model.params, images, return_maps=True)['anomaly_map']
    )
    outputs.write_anomaly_maps(os.path.join(workdir, 'anomaly_maps'), paths, np.asarray(maps))
  return csv_path
