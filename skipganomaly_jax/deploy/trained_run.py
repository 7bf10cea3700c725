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
    map_scale: the maps' `localisation.MapScale`, computed from the validation normals
      when the checkpoint was evaluated (None: saved before it was stored; --mode=eval
      stores it).
    path: the checkpoint's directory.
  """

  params: dict
  config: ml_collections.ConfigDict
  specs: config_lib.RunSpecs
  calibration: metrics.Calibration | None  # None only for weights imported uncalibrated.
  step: int
  history: list
  scorer: evaluation.DatasetScorer
  map_scale: localisation.MapScale | None = None
  path: str = ''


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
    return _best(ckpt, evaluated)
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


def _best(ckpt: checkpointing.Checkpointer, evaluated: list[int]) -> int:
  """The evaluated step whose validation normals have the lowest mean paper score.

  A label-free criterion (held-out normals only): the networks that reconstruct unseen
  normal images best. It holds for the paper score only; the run's score must be it.
  """
  kind = config_lib.from_stored(ckpt.restore_meta(evaluated[-1])['config']).score_kind
  if kind != 'paper':
    raise checkpointing.CheckpointError(
      '--checkpoint=best picks the checkpoint whose validation normals have the lowest '
      f"mean paper score; this run's score is {kind!r}, whose values do not rank "
      'checkpoints (latent k-NN distances shrink as the codes collapse; map scores are in '
      "units of each checkpoint's own validation normals). Use --checkpoint=latest or a "
      f'step ({evaluated}).'
    )
  best = ckpt.best_step()
  if best is None:
    raise checkpointing.CheckpointError(
      f'no checkpoint in {ckpt.directory} stores a validation score to rank by (imported '
      f'or older runs): use --checkpoint=latest or a step ({evaluated}).'
    )
  return best


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


def _checkpoints(workdir: str) -> str:
  """The run's checkpoints folder; raises CheckpointError if there is none."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise checkpointing.CheckpointError(
      f'no checkpoints folder {directory}: is {workdir!r} the workdir of a trained run?'
    )
  return directory


def restore(workdir: str, which='latest') -> TrainedModel:
  """The one place that reads a trained run: networks, bank, calibration, config, scorer.

  Args:
    workdir: the run's workdir (the one given to main.py).
    which: 'latest' (the newest evaluated checkpoint), 'best' (runs scored by the paper
      score: its lowest mean over the validation normals) or a step number.

  Raises:
    checkpointing.CheckpointError: no (evaluated) checkpoint, or a corrupt one.
    ValueError: a bad `which`, or a stored config this version does not understand.
  """
  which = config_lib.checkpoint_selector(which)
  directory = _checkpoints(workdir)
  with checkpointing.Checkpointer(directory) as ckpt:
    step = _select(ckpt, which)
    config, path = config_lib.from_stored(ckpt.restore_meta(step)['config']), ckpt.step_path(step)
    # The stored tree as the target: no optimiser or TrainState class is needed to read it.
    state, meta = ckpt.restore(step, _local(ckpt.abstract_state(step)))
  params = {'generator': _variables(state['g']), 'discriminator': _variables(state['d'])}
  if 'knn_bank' in state:
    params['knn_bank'] = state['knn_bank']
  specs = config_lib.specs(config)
  mesh = make_mesh(jax.local_devices()[:1])
  scale = meta.get('map_scale')
  return TrainedModel(
    params=params,
    config=config,
    specs=specs,
    calibration=meta['calibration'] and metrics.Calibration.from_dict(meta['calibration']),
    step=step,
    history=list(meta.get('history', [])),
    scorer=evaluation.make_scorer(ModelSpec.from_settings(specs.model), specs.score, mesh),
    map_scale=scale and localisation.MapScale.from_dict(scale),
    path=path,
  )


def load(workdir: str, which='latest'):
  """Loads a trained model for scoring.

  Args:
    workdir: the run's workdir (the one given to main.py).
    which: 'latest' (newest evaluated checkpoint), 'best' (runs scored by the paper score:
      its lowest mean over the validation normals) or a step number.

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


def stored_config(workdir: str, which='latest') -> tuple[ml_collections.ConfigDict, str]:
  """(the run's stored config, the checkpoint's directory) of the checkpoint `which`
  selects (as `restore` selects it); reads no arrays."""
  which = config_lib.checkpoint_selector(which)
  directory = _checkpoints(workdir)
  with checkpointing.Checkpointer(directory) as ckpt:
    step = _select(ckpt, which)
    return config_lib.from_stored(ckpt.restore_meta(step)['config']), ckpt.step_path(step)


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


def map_scale(model: TrainedModel) -> localisation.MapScale:
  """The scale of a run's maps (`--maps`, reconstructions.png, localisation.png, and the
  units of the 'rec+d' map), stored with the checkpoint when it was evaluated.

  Raises:
    checkpointing.CheckpointError: a checkpoint saved before the scale was stored; the
      message says how to add it (--mode=eval, once, with the run's data in place).
  """
  if model.map_scale is None:
    workdir = os.path.dirname(os.path.dirname(model.path))
    step = os.path.basename(model.path)
    raise checkpointing.CheckpointError(
      f'checkpoint {model.path} has no stored map scale (it was saved by an older '
      'version) and --mode=score reads no dataset. Store it once: `python main.py '
      f"--workdir={workdir} --mode=eval --checkpoint={step}` with the run's data in place "
      '(add --config.dataset.root=... if it moved), then score again.'
    )
  return model.map_scale


def score_path(workdir: str, images_path: str, write_maps: bool = False, which='latest'):
  """Scores image files (a file or a folder) the run's way, with its calibration.

  The scores come from the run's own scorer (its score_lambda, dtype and evaluation
  batch), so the 'anomalous' column uses the threshold fitted to that very score. Writes
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
  local = None  # A map score: the run's smoothed maps and their image scores.
  if specs.score.kind in localisation.MAP_SCORE_KINDS:
    settings = specs.localisation
    # 'rec+d' is in validation-normal units: stored with the checkpoint (no data read).
    terms = map_scale(model).terms if settings.map == 'rec+d' else None
    local = localisation.score_images(model.params, images, specs.score.kind, settings, terms)
  scores = local['score'] if local else model.scorer(model.params, images)['score']
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
      np.asarray(scores),
      model.calibration,
    )
  return csv_path
