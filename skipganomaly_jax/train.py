"""The training loop: `train_and_evaluate(config, workdir)`.

Epochs of the data-parallel step (train_step.py) over the training normals; after each
epoch, calibration on the held-out validation normals and evaluation on the test set
(evaluation.py, metrics.py); an Orbax checkpoint per epoch (checkpointing.py) holding
both TrainStates, the data-iterator position, the calibration and the config. A workdir
with checkpoints resumes from the latest one; SIGTERM (a preemption notice) saves a
checkpoint at the current step and returns. Only process 0 writes logs and outputs.
"""

import dataclasses
import json
import os
import signal
import time

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from skipganomaly_jax import (
  checkpointing,
  evaluation,
  input_pipeline,
  localisation,
  metrics,
  outputs,
  overlays,
)
from skipganomaly_jax import train_step as ts
from skipganomaly_jax.metric_writer import MetricWriter
from skipganomaly_jax.models import ModelSpec
from skipganomaly_jax.scoring import SCORE_KINDS, normalise_codes, scoring_variables


class DivergenceError(FloatingPointError):
  """A loss became NaN or Inf."""


@dataclasses.dataclass
class Run:
  """Everything fixed for one run: data, mesh, compiled functions, writers."""

  config: object
  workdir: str
  mesh: object
  spec: ModelSpec
  splits: input_pipeline.DataSplits
  train_iter: input_pipeline.TrainIterator
  steps_per_epoch: int
  step_fn: object
  scorer: evaluation.DatasetScorer
  checkpointer: checkpointing.Checkpointer
  writer: MetricWriter


class PreemptionFlag:
  """Set by SIGTERM; agreed on by all processes before anyone acts on it."""

  def __init__(self):
    self._set = False
    self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint at the next step, then exiting.')
    self._set = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._set
    return bool(multihost_utils.process_allgather(np.int32(self._set)).max())

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def setup(config, workdir: str) -> Run:
  """Loads the data, builds the mesh and the compiled step; checks the config."""
  spec = ModelSpec.from_config(config)
  dtype = ts.compute_dtype(config)
  mesh = ts.make_mesh()
  if config.score_kind not in SCORE_KINDS + localisation.MAP_SCORE_KINDS:
    raise ValueError(
      f'config.score_kind must be one of {SCORE_KINDS} or a map score '
      f'{localisation.MAP_SCORE_KINDS}; got {config.score_kind!r}.'
    )
  localisation.Settings.from_config(config)  # Checks config.localisation early.
  if config.batch_size % mesh.size:
    raise ValueError(
      f'config.batch_size={config.batch_size} must be a multiple of the '
      f'number of devices ({mesh.size}).'
    )
  splits = input_pipeline.load_splits(config)
  if len(splits.val) == 0:
    raise ValueError(
      'No validation images: set config.dataset.val_fraction > 0; the '
      'calibration (threshold) is fitted on them, never on the test set.'
    )
  train_iter = input_pipeline.TrainIterator(
    splits.train, config.batch_size, config.seed, jax.process_index(), jax.process_count()
  )
  steps = train_iter.steps_per_epoch
  if config.max_steps_per_epoch:
    steps = min(steps, config.max_steps_per_epoch)
  return Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    spec=spec,
    splits=splits,
    train_iter=train_iter,
    steps_per_epoch=steps,
    step_fn=ts.make_parallel_train_step(config, mesh),
    scorer=evaluation.DatasetScorer(spec, mesh, config.eval_batch_size, config.score_lambda, dtype),
    checkpointer=checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep_latest=config.keep_checkpoints
    ),
    writer=MetricWriter(workdir, enabled=jax.process_index() == 0),
  )


def restore_or_init(run: Run):
  """The latest checkpoint's states, k-NN bank and meta; or fresh states, None, {}."""
  init = ts.replicate(ts.create_train_states(run.config, jax.random.key(run.config.seed)), run.mesh)
  if run.checkpointer.latest_step() is None:
    return init, None, {}
  target = {'g': init[0], 'd': init[1]}
  bank_shape = run.checkpointer.restore_meta().get('knn_bank_shape')
  if bank_shape:
    target['knn_bank'] = ts.replicate(np.zeros(bank_shape, np.float32), run.mesh)
  state, meta = run.checkpointer.restore(None, target)
  logging.info('Resumed from %s.', run.checkpointer.step_path(int(state['g'].step)))
  run.train_iter.set_state(meta['data_iterator'])
  return (state['g'], state['d']), state.get('knn_bank'), meta


def build_knn_bank(run: Run, variables):
  """Unit-norm bottleneck codes of (up to config.knn_bank_size) training normals.

  Eval-mode BatchNorm, the model being evaluated; a seeded subset when the training set
  is larger than the cap. Validation and test images are never in the bank.

  Returns:
    (M, code) float32, replicated on the mesh; None for the paper score.
  """
  if run.config.score_kind != 'latent_knn':
    return None
  train, cap = run.splits.train, run.config.knn_bank_size
  if len(train) > cap:
    pick = np.random.default_rng([run.config.seed, 2]).choice(len(train), cap, replace=False)
    train = train[np.sort(pick)]
  codes = run.scorer(variables, train, keys=('code',))['code']
  return ts.replicate(np.asarray(normalise_codes(codes)), run.mesh)


def check_and_log(run: Run, pending: list, pbar, tick: float) -> None:
  """Fetches pending step metrics, stops on NaN/Inf, writes their means.

  `tick` is when the first pending step was dispatched; the fetch waits for the last
  one, so the elapsed time after it covers all pending steps (dispatch is asynchronous).
  """
  if not pending:
    return
  steps, host = [s for s, _ in pending], jax.device_get([m for _, m in pending])
  seconds = time.perf_counter() - tick
  for step, m in zip(steps, host, strict=True):
    bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
    if bad:
      raise DivergenceError(
        f'Training diverged at step {step}: non-finite {bad}. The last checkpoint in '
        f'{run.checkpointer.directory} is intact; try a lower --config.optim.lr.'
      )
  means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  means['images_per_second'] = len(pending) * run.config.batch_size / max(seconds, 1e-9)
  run.writer.write_scalars(steps[-1], means, prefix='train/')
  if pbar is not None:
    pbar.set_postfix(
      g=f'{means["g_loss"]:.3f}',
      d=f'{means["d_loss"]:.3f}',
      img_s=f'{means["images_per_second"]:.0f}',
    )


def train_epoch(run: Run, g, d, step: int, stop: PreemptionFlag):
  """Runs the rest of the current epoch; returns (g, d, step, finished)."""
  key = jax.random.key(run.config.seed)
  position = run.train_iter.get_state()
  pbar = None
  if jax.process_index() == 0:
    pbar = tqdm.tqdm(
      total=run.steps_per_epoch,
      initial=position['step_in_epoch'],
      desc=f'epoch {position["epoch"] + 1}/{run.config.num_epochs}',
      leave=False,
      dynamic_ncols=True,
    )
  pending, tick = [], time.perf_counter()
  for i in range(position['step_in_epoch'], run.steps_per_epoch):
    batch = ts.shard_batch(next(run.train_iter), run.mesh)
    g, d, m = run.step_fn(g, d, batch, jax.random.fold_in(key, step))
    step += 1
    pending.append((step, m))
    if pbar is not None:
      pbar.update(1)
    last = i + 1 == run.steps_per_epoch
    if len(pending) >= run.config.log_every_steps or last:
      check_and_log(run, pending, pbar, tick)
      pending, tick = [], time.perf_counter()
      if not last and stop.requested():
        return g, d, step, False
  if pbar is not None:
    pbar.close()
  run.train_iter.set_state({'epoch': position['epoch'] + 1, 'step_in_epoch': 0})
  return g, d, step, True


def evaluate_epoch(run: Run, g, d, epoch: int, step: int):
  """Builds the k-NN bank, calibrates on validation normals, evaluates on the test set.

  Returns:
    (report, calibration, test_scores, knn_bank); the report's 'auroc' etc. are of
    config.score_kind's score, 'paper_score_auroc' always of the paper's.
  """
  knn_bank = build_knn_bank(run, scoring_variables(g, d))
  variables = scoring_variables(g, d, knn_bank)
  val_scores = run.scorer(variables, run.splits.val)['score']
  test = run.scorer(variables, run.splits.test)
  test_scores = test['score']
  loc = None  # Localisation (issue 12): map scores, pixel AUROC and PRO when masks exist.
  if localisation.needed(run.config, run.splits):
    loc = localisation.evaluate(run.config, jax.device_get(variables), run.splits)
    if loc.test_scores is not None:
      val_scores, test_scores = loc.val_scores, loc.test_scores
  calibration = metrics.Calibration.fit(val_scores, run.config.threshold_percentile)
  report = metrics.evaluate(run.splits.test_labels, test_scores, calibration)
  report.update(loc.report if loc else {}, score_kind=run.config.score_kind)
  report.update(epoch=epoch, step=step, val_score=float(np.mean(val_scores)))
  report['paper_score_auroc'] = metrics.auroc(run.splits.test_labels, test['paper_score'])
  if run.config.protocol == 'reference':
    # On one local device in each process: host copies of the global arrays.
    ref = evaluation.reference_protocol_scores(
      jax.device_get(variables), run.splits.test, run.spec, run.config.score_lambda
    )
    report['reference_protocol_auroc'] = metrics.auroc(run.splits.test_labels, ref)
  run.writer.write_scalars(
    step, {k: v for k, v in report.items() if isinstance(v, int | float)}, prefix='eval/'
  )
  return report, calibration, test_scores, knn_bank


def save(run: Run, g, d, knn_bank, step: int, history, calibration, val_score=None) -> None:
  """Starts an asynchronous checkpoint of the states, k-NN bank, data position, etc.

  The bank and calibration are those of the last evaluation (a mid-epoch preemption
  checkpoint keeps the previous epoch's, which resuming recomputes anyway).
  """
  meta = {
    'config': json.loads(run.config.to_json()),
    'calibration': calibration.to_dict() if calibration else None,
    'data_iterator': run.train_iter.get_state(),
    'history': history,
    'knn_bank_shape': None if knn_bank is None else list(knn_bank.shape),
  }
  state = {'g': g, 'd': d} | ({} if knn_bank is None else {'knn_bank': knn_bank})
  run.checkpointer.save(step, state, meta, None if val_score is None else {'val_score': val_score})


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or resumes) a Skip-GANomaly model, evaluating after every epoch.

  Args:
    config: a ConfigDict (see configs/default.py).
    workdir: where checkpoints, logs and outputs go; a workdir with checkpoints resumes.

  Returns:
    The last epoch's evaluation report (empty if preempted before any evaluation).
  """
  run = setup(config, workdir)
  (g, d), knn_bank, meta = restore_or_init(run)
  history, calibration = meta.get('history', []), meta.get('calibration')
  calibration = calibration and metrics.Calibration.from_dict(calibration)
  step, stop, test_scores = int(jax.device_get(g.step)), PreemptionFlag(), None
  try:
    while run.train_iter.get_state()['epoch'] < config.num_epochs:
      g, d, step, finished = train_epoch(run, g, d, step, stop)
      if not finished:
        save(run, g, d, knn_bank, step, history, calibration)
        logging.warning('Preempted: saved step %d; rerun the same command to resume.', step)
        return history[-1] if history else {}
      report, calibration, test_scores, knn_bank = evaluate_epoch(run, g, d, len(history) + 1, step)
      history.append(report)
      logging.info('epoch %d: %s', report['epoch'], _summary(report))
      save(run, g, d, knn_bank, step, history, calibration, report['val_score'])
    run.checkpointer.wait()
    if test_scores is None and history:  # Resumed after the last epoch: score again.
      test_scores = run.scorer(scoring_variables(g, d, knn_bank), run.splits.test)['score']
      if config.score_kind in localisation.MAP_SCORE_KINDS:
        host = jax.device_get(scoring_variables(g, d))
        test_scores = localisation.evaluate(config, host, run.splits).test_scores
    if history and jax.process_index() == 0:
      # Host copies: a jit over the global (all-process) arrays would have to run in
      # every process, but only process 0 plots.
      outputs.write_all(
        workdir,
        run.splits,
        jax.device_get(scoring_variables(g, d, knn_bank)),
        test_scores,
        history,
        calibration,
      )
      overlays.write_overlays(workdir, config, jax.device_get(scoring_variables(g, d)), run.splits)
  finally:
    stop.restore()
    run.checkpointer.close()
    run.writer.close()
  return history[-1] if history else {}


def _summary(report: dict) -> str:
  keys = (
    'auroc',
    'average_precision',
    'f1',
    'val_score',
    'paper_score_auroc',
    'reference_protocol_auroc',
    'pixel_auroc',
    'pro',
  )
  return ', '.join(f'{k}={report[k]:.4f}' for k in keys if k in report)
