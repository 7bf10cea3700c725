"""SIGTERM (a preemption notice) through main.py: a checkpoint at the current step, exit 0,
and a rerun of the same command resumes there and ends where an uninterrupted run ends.
In process: SIGTERM during an evaluation, and load() of a run preempted after an epoch.

The uninterrupted run is the session's `cli_run` (conftest.py): the preempted run is the
same command (CLI_EPOCHS epochs of CLI_STEPS steps, metrics logged every step)."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import CLI_EPOCHS, CLI_STEPS, ROOT, digits_config, main_cmd

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.deploy import trained_run
from skipganomaly_jax.scoring import evaluation, metrics
from skipganomaly_jax.scoring.scores import score_details, score_fn
from skipganomaly_jax.training import checkpointing, train

STEPS = CLI_STEPS  # Per epoch; SIGTERM arrives after the first step.
TOTAL = CLI_EPOCHS * CLI_STEPS
TIMEOUT_S = 300


def start(workdir, flags):
  log = open(workdir.parent / f'{workdir.name}.log', 'a')  # noqa: SIM115
  try:
    return subprocess.Popen(
      main_cmd(workdir, *flags), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
  finally:
    log.close()


def finish(proc, timeout_s: float = TIMEOUT_S) -> int:
  """Waits for proc (killing it at the deadline) and returns its exit code."""
  try:
    return proc.wait(timeout=timeout_s)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def train_steps(workdir) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.is_file():
    return []
  lines = path.read_text().split('\n')[:-1]  # Complete lines only (it may be being written).
  records = [json.loads(line) for line in lines]
  return [r['step'] for r in records if 'train/g_loss' in r]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, cli_run):
  """(uninterrupted, preempted, flags): workdirs (the preempted one after SIGTERM only)
  and the command's training flags."""
  preempted = tmp_path_factory.mktemp('preemption') / 'preempted'
  preempted.mkdir()
  proc = start(preempted, cli_run.flags)
  try:
    deadline = time.time() + TIMEOUT_S
    while not train_steps(preempted):
      log = (preempted.parent / 'preempted.log').read_text()[-3000:]
      assert proc.poll() is None, f'exited early:\n{log}'
      assert time.time() < deadline, 'no training step was logged'
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, (preempted.parent / 'preempted.log').read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return cli_run.workdir, preempted, cli_run.flags


@pytest.fixture(scope='module')
def saved_step(runs):
  with checkpointing.Checkpointer(runs[1] / 'checkpoints') as ckpt:
    return ckpt.latest_step()


def test_sigterm_saves_a_mid_epoch_checkpoint_and_exits_0(runs, saved_step):
  _, preempted, _ = runs
  assert saved_step is not None and 0 < saved_step < STEPS, saved_step
  log = (preempted.parent / 'preempted.log').read_text()
  assert f'Preempted: saved step {saved_step}' in log
  assert train_steps(preempted) == list(range(1, saved_step + 1))
  assert not (preempted / 'metrics.json').exists()  # Stopped before the evaluation.
  with checkpointing.Checkpointer(preempted / 'checkpoints') as ckpt:
    meta = ckpt.restore_meta()
  assert meta['data_iterator'] == {'epoch': 0, 'step_in_epoch': saved_step}
  # Networks of a moment no bank or calibration was computed for: not loadable.
  assert meta['calibration'] is None and meta['knn_bank_shape'] is None
  with pytest.raises(checkpointing.CheckpointError, match='no evaluated checkpoint'):
    trained_run.load(str(preempted))


def test_rerun_resumes_and_equals_uninterrupted(runs, saved_step):
  full, preempted, flags = runs
  assert finish(start(preempted, flags)) == 0, (preempted.parent / 'preempted.log').read_text()[
    -3000:
  ]
  log = (preempted.parent / 'preempted.log').read_text()
  assert f'Resumed from {preempted / "checkpoints" / str(saved_step)}' in log
  assert train_steps(preempted) == list(range(1, TOTAL + 1))  # No step twice or skipped.
  with checkpointing.Checkpointer(preempted / 'checkpoints') as ckpt:
    assert ckpt.latest_step() == TOTAL
  expected, _, _ = trained_run.load(str(full))
  got, _, _ = trained_run.load(str(preempted))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)
  reports = [json.loads((d / 'metrics.json').read_text())['final'] for d in (full, preempted)]
  assert reports[1]['auroc'] == pytest.approx(reports[0]['auroc'], abs=1e-6)


def tiny_run_config(npz: str, num_epochs: int):
  config = digits_config(npz)
  config.num_epochs, config.max_steps_per_epoch, config.log_every_steps = num_epochs, 2, 1
  config.eval_batch_size, config.score_kind = 64, 'latent_knn'  # Has a k-NN bank.
  return config


def test_load_of_a_run_preempted_after_an_epoch(tmp_path, monkeypatch, progress_bars, digits_npz):
  logged = train.check_and_log

  def sigterm_after_step_3(ctx, pending, pbar, tick):  # A real signal, to this process.
    logged(ctx, pending, pbar, tick)
    if pending and pending[-1][0] == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train, 'check_and_log', sigterm_after_step_3)
  config = tiny_run_config(digits_npz, num_epochs=2)
  report = train.train_and_evaluate(config, str(tmp_path))
  assert report['epoch'] == 1 and report['step'] == 2
  with checkpointing.Checkpointer(tmp_path / 'checkpoints') as ckpt:
    assert ckpt.all_steps() == [2, 3]
  # load() gives epoch 1's checkpoint, whose bank and calibration are its networks'.
  params, _, calibration = trained_run.load(str(tmp_path))
  splits = input_pipeline.load_splits(config_lib.specs(config).data)
  no_bank = {k: v for k, v in params.items() if k != 'knn_bank'}
  codes = np.asarray(score_details(no_bank, splits.train)['code'], np.float64)
  codes /= np.linalg.norm(codes, axis=1, keepdims=True)
  np.testing.assert_allclose(params['knn_bank'], codes, atol=1e-5)
  val = np.asarray(score_fn(params, splits.val))
  refit = metrics.Calibration.fit(val, config.threshold_percentile)
  assert calibration.threshold == pytest.approx(refit.threshold, rel=1e-4)
  with pytest.raises(checkpointing.CheckpointError, match='saved on preemption'):
    trained_run.load(str(tmp_path), 3)
  assert progress_bars and all(bar.closed for bar in progress_bars)


def test_sigterm_during_evaluation_stops_between_batches(tmp_path, monkeypatch, digits_npz):
  calls = []
  scorer_call = evaluation.DatasetScorer.__call__

  def sigterm_in_second_batch(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return scorer_call(self, *args, **kwargs)

  monkeypatch.setattr(evaluation.DatasetScorer, '__call__', sigterm_in_second_batch)
  config = tiny_run_config(digits_npz, num_epochs=1)  # The k-NN bank: 6 batches of 64.
  assert train.train_and_evaluate(config, str(tmp_path)) == {}
  assert len(calls) == 2  # No batch after the signal.
  assert not (tmp_path / 'metrics.json').exists()
  with checkpointing.Checkpointer(tmp_path / 'checkpoints') as ckpt:
    meta = ckpt.restore_meta()
    assert ckpt.all_steps() == [2] and meta['calibration'] is None
  monkeypatch.setattr(evaluation.DatasetScorer, '__call__', scorer_call)
  report = train.train_and_evaluate(config, str(tmp_path))  # Resumes with the evaluation.
  assert report['epoch'] == 1 and report['step'] == 2
  with checkpointing.Checkpointer(tmp_path / 'checkpoints') as ckpt:
    assert ckpt.all_steps() == [2] and ckpt.restore_meta()['calibration'] is not None
  _, _, calibration = trained_run.load(str(tmp_path))
  assert calibration.threshold == pytest.approx(report['threshold'])
