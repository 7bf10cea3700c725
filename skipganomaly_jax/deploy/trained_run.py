"""Loading a trained run (main.py's eval and score modes on it: run_modes.py).

params, config, calibration = skipganomaly_jax.load('runs/demo')
flags = calibration.is_anomalous(skipganomaly_jax.score_fn(params, images))

Everything is read from the run's checkpoint: the networks, the k-NN bank, the
calibration, the maps' scale and the run's config, checked and turned into its specs
(`restore`). `load`'s params carry the run's `RunScore` (its score kind, lambda, dtype,
map settings and units: `run_params`), so that `score_fn`, `--mode=score` and the
exported detector all compute the score the run was evaluated and calibrated with.
Only checkpoints whose bank and calibration belong to their networks are used: a
checkpoint saved on preemption (networks and data position only) is skipped by 'latest'
and refused by step number.
"""

import dataclasses
import os

import jax
import ml_collections

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.parallel import make_mesh
from skipganomaly_jax.scoring import evaluation, localisation, metrics
from skipganomaly_jax.scoring.run_score import KEY as RUN_SCORE
from skipganomaly_jax.scoring.run_score import RunScore
from skipganomaly_jax.training import checkpointing


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """One evaluated checkpoint of a run, and what scoring it the run's way needs.

  Attributes:
    params: the `score_fn` variables (with 'knn_bank' for the latent k-NN score), on
      this process's first device; bare (no 'run_score': `run_params` adds it).
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
    # Only what scoring uses is read: the Adam moments (2x the weights) and step stay UNREAD.
    def scoring_part(path, leaf):  # state['knn_bank'], state[net]['params' | 'batch_stats'].
      names = [getattr(k, 'key', None) for k in path[:2]]
      used = names[0] == 'knn_bank' or names[1:] in (['params'], ['batch_stats'])
      return leaf if used else checkpointing.UNREAD

    target = jax.tree_util.tree_map_with_path(scoring_part, _local(ckpt.abstract_state(step)))
    state, meta = ckpt.restore(step, target)
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


def run_score(model: TrainedModel) -> RunScore:
  """The `RunScore` of a restored checkpoint: its config's score kind, lambda, dtype and
  map settings, and for the 'rec+d' map the units stored with the checkpoint.

  Raises:
    checkpointing.CheckpointError: a 'rec+d' map-score checkpoint saved before its map
      scale was stored (the message says how to store it).
  """
  specs = model.specs
  settings = specs.localisation
  needs_units = specs.score.kind in localisation.MAP_SCORE_KINDS and settings.map == 'rec+d'
  terms = map_scale(model).terms if needs_units else None
  return RunScore.from_specs(specs.model, specs.score, settings, terms)


def run_params(model: TrainedModel) -> dict:
  """`model.params` with the run's `RunScore` under 'run_score': what `score_fn` needs
  to compute the run's own score (see `run_score`)."""
  return {**model.params, RUN_SCORE: run_score(model)}


def load(workdir: str, which='latest'):
  """Loads a trained run for scoring: `score_fn(params, images)` is the run's own score.

  Args:
    workdir: the run's workdir (the one given to main.py).
    which: 'latest' (newest evaluated checkpoint), 'best' (runs scored by the paper score:
      its lowest mean over the validation normals) or a step number.

  Returns:
    (params, config, calibration), all of the same checkpoint: the `score_fn` variables
    of both networks (with the 'knn_bank' of training codes when the run used the
    latent k-NN score) and, under 'run_score', the run's `RunScore`: its score kind
    (map kinds included), lambda, compute dtype, map settings and map units. So
    `score_fn(params, images)` computes the score the run was evaluated with and
    `calibration.is_anomalous(score_fn(params, images))` is its decision, for every
    score kind; `score_details` gives all its scores. Then the run's ConfigDict and its
    `metrics.Calibration` (None only for weights imported without their dataset).

  Raises:
    checkpointing.CheckpointError: no evaluated checkpoint, or a corrupt one (names the
      path); a 'rec+d' map-score checkpoint saved before its map scale was stored (says
      how to store it).
  """
  model = restore(workdir, which)
  return run_params(model), model.config, model.calibration


def stored_config(workdir: str, which='latest') -> tuple[ml_collections.ConfigDict, str]:
  """(the run's stored config, the checkpoint's directory) of the checkpoint `which`
  selects (as `restore` selects it); reads no arrays."""
  which = config_lib.checkpoint_selector(which)
  directory = _checkpoints(workdir)
  with checkpointing.Checkpointer(directory) as ckpt:
    step = _select(ckpt, which)
    return config_lib.from_stored(ckpt.restore_meta(step)['config']), ckpt.step_path(step)


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
