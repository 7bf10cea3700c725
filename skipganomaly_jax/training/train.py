"""The training loop: `train_and_evaluate(config, workdir)`.

Epochs of the data-parallel step (training_step.py) over the training normals; after each
epoch, calibration on the held-out validation normals and evaluation on the test set
(evaluation.py, metrics.py); an Orbax checkpoint per epoch (checkpointing.py) holding
both TrainStates, the k-NN bank, the data-iterator position, the calibration and the
config. A workdir with checkpoints resumes from the latest one.

SIGTERM (a preemption notice, preemption.py) is checked after every step and between
evaluation batches; the run then saves a checkpoint at the current step and returns. Such
a checkpoint holds the networks and the data position only: no k-NN bank and no
calibration, which would belong to an earlier moment (and no val_score, so it is never
'best'). Resuming finishes the epoch, or its interrupted evaluation, first. Only process
0 writes logs and outputs.
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
import tqdm
from absl import logging

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.parallel import make_mesh, replicate, shard_batch
from skipganomaly_jax.reporting import outputs, overlays
from skipganomaly_jax.reporting.metric_writer import MetricWriter, eval_scalars
from skipganomaly_jax.scoring import evaluation, localisation, metrics
from skipganomaly_jax.scoring.scores import scoring_variables
from skipganomaly_jax.training import checkpointing, training_step
from skipganomaly_jax.training.preemption import PreemptionFlag


class DivergenceError(FloatingPointError):
  """A loss became NaN or Inf."""


@dataclasses.dataclass
class TrainingContext:
  """Everything fixed for one run: its specs, data, mesh, compiled functions, writers.

  `config` is kept only to be stored with each checkpoint; everything below the top
  reads `specs`.
  """

  config: object
  specs: config_lib.RunSpecs
  workdir: str
  mesh: object
  step_spec: training_step.StepSpec
  splits: input_pipeline.DataSplits
  train_iter: input_pipeline.TrainIterator  # DeviceTrainIterator, or a PrefetchIterator.
  steps_per_epoch: int
  step_fn: object
  scorer: evaluation.DatasetScorer
  checkpointer: checkpointing.Checkpointer
  writer: MetricWriter


def setup(config, workdir: str) -> TrainingContext:
  """Checks the config (every field, before any data is read), loads the data, builds
  the mesh and the compiled step."""
  mesh = make_mesh()
  specs = config_lib.specs(config, devices=mesh.size)
  step_spec = training_step.StepSpec.from_specs(specs)
  splits = input_pipeline.load_splits(specs.data)
  run = specs.train
  train_iter = input_pipeline.train_iterator(
    splits.train, run.batch_size, run.seed, mesh, run.device_data
  )
  steps = train_iter.steps_per_epoch
  if run.max_steps_per_epoch:
    steps = min(steps, run.max_steps_per_epoch)
  return TrainingContext(
    config=config,
    specs=specs,
    workdir=workdir,
    mesh=mesh,
    step_spec=step_spec,
    splits=splits,
    train_iter=train_iter,
    steps_per_epoch=steps,
    step_fn=training_step.make_parallel_train_step(step_spec, mesh, fold_in_step=True),
    scorer=evaluation.make_scorer(step_spec.model, specs.score, mesh),
    checkpointer=checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep_latest=run.keep_checkpoints
    ),
    writer=MetricWriter(workdir, enabled=jax.process_index() == 0),
  )


def restore_or_init(ctx: TrainingContext):
  """The latest checkpoint's states, k-NN bank and meta; or fresh states, None, {}."""
  init = replicate(
    training_step.create_train_states(ctx.step_spec, jax.random.key(ctx.specs.train.seed)),
    ctx.mesh,
  )
  if ctx.checkpointer.latest_step() is None:
    return init, None, {}
  target = {'g': init[0], 'd': init[1]}
  bank_shape = ctx.checkpointer.restore_meta().get('knn_bank_shape')
  if bank_shape:
    target['knn_bank'] = replicate(np.zeros(bank_shape, np.float32), ctx.mesh)
  state, meta = ctx.checkpointer.restore(None, target)
  logging.info('Resumed from %s.', ctx.checkpointer.step_path(int(state['g'].step)))
  ctx.train_iter.set_state(meta['data_iterator'])
  return (state['g'], state['d']), state.get('knn_bank'), meta


def build_knn_bank(ctx: TrainingContext, variables, stop=None):
  """`evaluation.knn_bank` of the training normals, replicated on the mesh.

  Built at every evaluation whatever the score kind (every evaluation reports both
  scores: 'latent_knn_auroc' is in every history entry, which benchmarks/quality.py
  reads); stored with the checkpoint only for score_kind='latent_knn'. Computed on the
  devices and left there (replicate is then a no-op).

  Raises:
    evaluation.Interrupted: `stop()` returned True between batches.
  """
  bank = evaluation.knn_bank(ctx.scorer, variables, ctx.splits.train, ctx.specs.score, stop)
  return replicate(bank, ctx.mesh)


def check_and_log(ctx: TrainingContext, pending: list, pbar, tick: float) -> None:
  """Fetches pending step metrics, stops on NaN/Inf, writes their means.

  `tick` is when the first pending step was dispatched; the fetch waits for the last
  one, so the elapsed time after it covers all pending steps (dispatch is asynchronous).
  """
  if not pending:
    return
  steps = [s for s, _ in pending]
  # {name: one value per step}: a transfer per name, not per step and name.
  host = jax.device_get(training_step.stack_metrics([m for _, m in pending]))
  seconds = time.perf_counter() - tick
  for i, step in enumerate(steps):
    bad = {k: float(v[i]) for k, v in host.items() if not np.isfinite(v[i])}
    if bad:
      raise DivergenceError(
        f'Training diverged at step {step}: non-finite {bad}. The last checkpoint in '
        f'{ctx.checkpointer.directory} is intact; try a lower --config.optim.lr.'
      )
  means = {k: float(np.mean(v)) for k, v in host.items()}
  means['images_per_second'] = len(pending) * ctx.specs.train.batch_size / max(seconds, 1e-9)
  ctx.writer.write_scalars(steps[-1], means, prefix='train/')
  if pbar is not None:
    pbar.set_postfix(
      g=f'{means["g_loss"]:.3f}',
      d=f'{means["d_loss"]:.3f}',
      img_s=f'{means["images_per_second"]:.0f}',
    )


def train_epoch(ctx: TrainingContext, g, d, step: int, stop: PreemptionFlag):
  """Runs the rest of the current epoch; returns (g, d, step, finished).

  Checks `stop` after every step and returns unfinished when it is set. At most two
  steps are in flight (each dispatch waits for the step before the previous one), so
  stopping never waits for a long queue of dispatched steps.
  """
  key = jax.random.key(ctx.specs.train.seed)
  position = ctx.train_iter.get_state()
  pending, tick = [], time.perf_counter()
  with tqdm.tqdm(
    total=ctx.steps_per_epoch,
    initial=position['step_in_epoch'],
    desc=f'epoch {position["epoch"] + 1}/{ctx.specs.train.num_epochs}',
    leave=False,
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
  ) as pbar:  # Closed on every exit: end of epoch, preemption, exception.
    for i in range(position['step_in_epoch'], ctx.steps_per_epoch):
      batch = next(ctx.train_iter)
      if isinstance(batch, np.ndarray):  # Host batches: this process's rows.
        batch = shard_batch(batch, ctx.mesh)
      # The step folds its count into the key on the device: no dispatch here for it.
      g, d, m = ctx.step_fn(g, d, batch, key)
      stop.arm()  # After the first step's compilation (see preemption.py).
      if pending:  # One output: all of a step's outputs are ready together.
        jax.block_until_ready(pending[-1][1]['g_loss'])
      step += 1
      pending.append((step, m))
      pbar.update(1)
      last = i + 1 == ctx.steps_per_epoch
      if len(pending) >= ctx.specs.train.log_every_steps or last:
        check_and_log(ctx, pending, pbar, tick)
        pending, tick = [], time.perf_counter()
      if not last and stop.requested():
        check_and_log(ctx, pending, pbar, tick)  # Never save a diverged state.
        return g, d, step, False
  ctx.train_iter.set_state({'epoch': position['epoch'] + 1, 'step_in_epoch': 0})
  return g, d, step, True


def evaluate_epoch(ctx: TrainingContext, g, d, epoch: int, step: int, stop=None):
  """Builds the k-NN bank, calibrates on validation normals, evaluates on the test set.

  Returns:
    (report, calibration, test_scores, knn_bank); the report leads with
    'paper_score_auroc' and 'latent_knn_auroc' (both scores, always), then 'auroc' etc.
    of the run's score kind; knn_bank is None unless that is 'latent_knn'.

  Raises:
    evaluation.Interrupted: `stop()` returned True between batches.
  """
  knn_bank = build_knn_bank(ctx, scoring_variables(g, d), stop)
  variables = scoring_variables(g, d, knn_bank)  # 'score' is then the latent k-NN one.
  report, calibration, test_scores = evaluation.evaluate(
    ctx.scorer, variables, ctx.splits, ctx.specs.score, ctx.specs.localisation, stop=stop
  )
  if ctx.specs.score.kind != 'latent_knn':
    knn_bank = None  # The paper score's checkpoints and params carry no bank.
  report = {**report, 'epoch': epoch, 'step': step}  # Led by the scores' AUROCs.
  ctx.writer.write_scalars(step, eval_scalars(report), prefix='eval/')  # Tags name the score.
  return report, calibration, test_scores, knn_bank


def save(ctx: TrainingContext, g, d, step: int, history, evaluated=None) -> None:
  """Starts an asynchronous checkpoint of the states, data position, history, config.

  Args:
    ctx: the run.
    g: generator state.
    d: discriminator state.
    step: the training step.
    history: the evaluation reports so far.
    evaluated: (knn_bank, calibration, val_score) of exactly these networks, or None for
      a preemption checkpoint, which then stores neither bank nor calibration. An
      evaluated checkpoint also stores its maps' `localisation.MapScale` (from the
      validation normals), so that --mode=score never reads the training data.
  """
  knn_bank, calibration, val_score = evaluated or (None, None, None)
  scale = None
  if evaluated is not None:
    variables = scoring_variables(g, d)  # Left on the devices: map_scale uses local copies.
    scale = localisation.map_scale(variables, ctx.splits.val, ctx.specs.localisation)
  meta = {
    'config': json.loads(ctx.config.to_json()),
    'calibration': calibration.to_dict() if calibration else None,
    'data_iterator': ctx.train_iter.get_state(),
    'history': history,
    'knn_bank_shape': None if knn_bank is None else list(knn_bank.shape),
    'map_scale': scale and scale.to_dict(),
  }
  state = {'g': g, 'd': d} | ({} if knn_bank is None else {'knn_bank': knn_bank})
  if step in ctx.checkpointer.all_steps():
    # The preemption checkpoint of this very step, taken during its evaluation: replaced
    # by the complete one (if killed in between, the previous epoch's is the latest).
    ctx.checkpointer.delete(step)
  ctx.checkpointer.save(step, state, meta, None if val_score is None else {'val_score': val_score})


def _train_loop(ctx: TrainingContext, g, d, knn_bank, history: list, stop: PreemptionFlag):
  """Trains and evaluates the remaining epochs (first the evaluation an epoch lacks).

  Returns:
    (g, d, knn_bank, calibration, test_scores); the last two None if nothing was evaluated.

  Raises:
    evaluation.Interrupted: preempted; `g`, `d`, the step and `history` are saved first.
  """
  step, calibration, test_scores = int(jax.device_get(g.step)), None, None
  try:
    while True:
      epoch = ctx.train_iter.get_state()['epoch']  # Epochs trained.
      if epoch > len(history):  # The last epoch trained is not evaluated yet.
        report, calibration, test_scores, knn_bank = evaluate_epoch(
          ctx, g, d, epoch, step, stop.requested
        )
        history.append(report)
        logging.info('epoch %d: %s', epoch, outputs.summary(report, validation=True))
        save(ctx, g, d, step, history, (knn_bank, calibration, report['val_score']))
      elif epoch >= ctx.specs.train.num_epochs:
        return g, d, knn_bank, calibration, test_scores
      else:
        g, d, step, finished = train_epoch(ctx, g, d, step, stop)
        if not finished:
          raise evaluation.Interrupted
  except evaluation.Interrupted:
    if step not in ctx.checkpointer.all_steps():
      save(ctx, g, d, step, history)
    logging.warning('Preempted: saved step %d; rerun the same command to resume.', step)
    raise


def _map_scale(ctx: TrainingContext, stored: dict | None, host_variables) -> localisation.MapScale:
  """The maps' scale `stored` with the latest (evaluated) checkpoint, that of these
  networks; computed from the validation normals for a checkpoint written before it was."""
  if stored:
    return localisation.MapScale.from_dict(stored)
  return localisation.map_scale(host_variables, ctx.splits.val, ctx.specs.localisation)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or resumes) a Skip-GANomaly model, evaluating after every epoch.

  Args:
    config: a ConfigDict (see configs/default.py); every field is checked first.
    workdir: where checkpoints, logs and outputs go; a workdir with checkpoints resumes.

  Returns:
    The last epoch's evaluation report (empty if preempted before any evaluation).
  """
  ctx = setup(config, workdir)
  (g, d), knn_bank, meta = restore_or_init(ctx)
  history, calibration = meta.get('history', []), meta.get('calibration')
  calibration = calibration and metrics.Calibration.from_dict(calibration)
  stop = PreemptionFlag()
  logging.info(
    'Training from step %d, epoch %d of %d; SIGTERM saves a checkpoint, then exits.',
    int(jax.device_get(g.step)),
    ctx.train_iter.get_state()['epoch'] + 1,
    ctx.specs.train.num_epochs,
  )
  try:
    g, d, knn_bank, new_calibration, test_scores = _train_loop(ctx, g, d, knn_bank, history, stop)
    calibration = new_calibration or calibration
    ctx.checkpointer.wait()
    variables = scoring_variables(g, d, knn_bank)
    if test_scores is None and history:  # Resumed after the last epoch: score again.
      test_scores = ctx.scorer(variables, ctx.splits.test)['score']
      kind = ctx.specs.score.kind
      if kind in localisation.MAP_SCORE_KINDS:
        test_scores = localisation.evaluate(  # On a local copy of the networks.
          scoring_variables(g, d), ctx.splits, kind, ctx.specs.localisation
        ).test_scores
    # Read in every process: Orbax synchronises the processes before a read.
    stored_scale = ctx.checkpointer.restore_meta(None).get('map_scale') if history else None
    if history and jax.process_index() == 0:
      # Host copies: a jit over the global (all-process) arrays would have to run in
      # every process, but only process 0 plots.
      host = jax.device_get(variables)
      settings = ctx.specs.localisation
      scale = _map_scale(ctx, stored_scale, host)  # Of the pictures' maps.
      outputs.write_all(
        workdir,
        ctx.splits,
        host,
        test_scores,
        history,
        calibration,
        ctx.specs.score,
        settings,
        scale,
      )
      overlays.write_overlays(workdir, settings, host, ctx.splits, test_scores, calibration, scale)
  except evaluation.Interrupted:
    pass  # Saved; the checkpointer's close below waits for the write.
  finally:
    stop.restore()
    ctx.checkpointer.close()
    ctx.writer.close()
    ctx.train_iter.close()  # Stops the host batches' prefetch thread, if any.
  return history[-1] if history else {}
