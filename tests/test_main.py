"""End to end through main.py on the offline digits with a tiny model: training,
outputs, kill -9 and resume, eval and score modes, load + score_fn, bad checkpoints.

The run through main.py is the session's `cli_run` (conftest.py), shared with
test_preemption.py and test_export.py; eval and score modes and flag errors run main()
in this process (`main_in_process`); kill -9 and the resume are processes of their own."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from absl import app, flags
from conftest import (
  CLI_EPOCHS,
  CLI_STEPS,
  DIGITS_TEST_ABNORMAL,
  DIGITS_TEST_NORMAL,
  ROOT,
  digits_config,
  load_config,
  main_cmd,
  main_in_process,
  tiny,
)
from PIL import Image

import skipganomaly_jax
from skipganomaly_jax import config as config_lib
from skipganomaly_jax import score_fn
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.deploy import trained_run
from skipganomaly_jax.scoring import metrics
from skipganomaly_jax.training import checkpointing, train

EPOCHS, STEPS = CLI_EPOCHS, CLI_STEPS
CONFIG = f'--config={ROOT}/configs/demo.py'


def run_main(workdir, *flags):
  return subprocess.run(
    main_cmd(workdir, *flags), cwd=ROOT, capture_output=True, text=True, timeout=900
  )


@pytest.fixture(scope='module')
def trained(cli_run):
  """The workdir of the session's run through main.py (conftest.cli_run)."""
  return cli_run.workdir


def info_sources(stderr: str) -> set:
  """The source files of the absl INFO lines in a run's stderr."""
  return set(re.findall(r'^I\d{4} [^\]]* (\S+?\.py):\d+\]', stderr, flags=re.MULTILINE))


def test_default_logs_are_ours_only(cli_run):
  # Orbax alone logged about 60 INFO lines per checkpoint. By default: our progress bar
  # and our lines only: the JAX process, 'Training from step 0', one summary per epoch.
  stderr = cli_run.stderr
  assert info_sources(stderr) == {'main.py', 'train.py'}, stderr[-3000:]
  lines = [line for line in stderr.split('\n') if line.strip()]  # (The bar's '\r' is '\n'.)
  logs = [line for line in lines if re.match(r'[IWEF]\d{4} ', line)]
  bars = [line for line in lines if re.match(r'epoch \d+/\d+: ', line)]
  assert len(logs) + len(bars) == len(lines), lines
  assert len(logs) == EPOCHS + 2 and sum('] epoch ' in line for line in logs) == EPOCHS, logs


def test_training_writes_checkpoints_metrics_and_plots(trained):
  for name in (
    'metrics.json',
    'metrics.jsonl',
    'roc.png',
    'score_histogram.png',
    'reconstructions.png',
  ):
    assert (trained / name).is_file(), name
  report = json.loads((trained / 'metrics.json').read_text())
  assert len(report['history']) == EPOCHS
  final = report['final']
  assert final['num_normal'] == DIGITS_TEST_NORMAL  # The AUROC's value: test_load_and_*.
  assert final['num_abnormal'] == DIGITS_TEST_ABNORMAL and final['step'] == EPOCHS * STEPS
  with checkpointing.Checkpointer(trained / 'checkpoints') as ckpt:
    assert ckpt.latest_step() == EPOCHS * STEPS
  lines = (trained / 'metrics.jsonl').read_text().splitlines()
  assert any('train/g_loss' in json.loads(line) for line in lines)
  evals = [json.loads(line) for line in lines if 'eval/auroc/paper' in json.loads(line)]
  assert evals[-1]['eval/auroc/paper'] == pytest.approx(final['auroc'], abs=1e-6)
  with Image.open(trained / 'reconstructions.png') as img:
    assert img.size[0] > 100 and img.size[1] > 100


def test_tensorboard_events_are_readable(trained):
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415

  acc = event_accumulator.EventAccumulator(str(trained / 'tensorboard'))
  acc.Reload()
  assert 'train/g_loss' in acc.Tags()['scalars']
  assert len(acc.Scalars('eval/auroc/paper')) == EPOCHS


def test_load_and_score_fn_reproduce_the_reported_auroc(trained):
  # score_fn and the training-time scorer batch differently; float32 noise (~1e-7 of a
  # score) could flip a near-tie pair (1 of the 4,500 pairs moves AUROC by 2.2e-4; none
  # of the 140 scores is that close to another here), hence abs=1e-4.
  params, config, calibration = skipganomaly_jax.load(str(trained))  # The public API.
  splits = input_pipeline.load_splits(config_lib.specs(config).data)
  scores = np.asarray(score_fn(params, splits.test))
  reported = json.loads((trained / 'metrics.json').read_text())['final']
  assert metrics.auroc(splits.test_labels, scores) == pytest.approx(reported['auroc'], abs=1e-4)
  assert calibration.threshold == pytest.approx(reported['threshold'])
  # The default paper score: no bank stored, 'auroc' is the paper score's, and the
  # latent k-NN AUROC reported beside it is numpy's k-NN over the training normals' codes.
  assert config.score_kind == 'paper' and 'knn_bank' not in params
  assert reported['auroc'] == reported['paper_score_auroc']
  assert list(reported)[:2] == ['paper_score_auroc', 'latent_knn_auroc']
  codes = {
    name: np.asarray(skipganomaly_jax.score_details(params, images)['code'], np.float64)
    for name, images in (('train', splits.train), ('test', splits.test))
  }
  unit = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in codes.items()}
  similarity = np.sort(unit['test'] @ unit['train'].T, axis=1)[:, -5:]
  knn = 1.0 - similarity.mean(axis=1)
  assert metrics.auroc(splits.test_labels, knn) == pytest.approx(
    reported['latent_knn_auroc'], abs=2e-3
  )


def test_kill_and_resume_equals_uninterrupted(cli_run, tmp_path):
  trained = cli_run.workdir
  proc = subprocess.Popen(
    main_cmd(tmp_path, *cli_run.flags),
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  first = tmp_path / 'checkpoints' / str(STEPS)
  try:
    deadline = time.time() + 600
    while not (first / '_CHECKPOINT_METADATA').exists():
      assert proc.poll() is None and time.time() < deadline, 'no checkpoint appeared'
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  with checkpointing.Checkpointer(tmp_path / 'checkpoints') as ckpt:
    assert ckpt.latest_step() < EPOCHS * STEPS, 'the run finished before it was killed'
  resumed = run_main(tmp_path, *cli_run.flags, '--verbosity=0')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # An explicit --verbosity shows the libraries' INFO logs again (Orbax's restore).
  sources = info_sources(resumed.stderr)
  assert sources - {'main.py', 'train.py', 'trained_run.py'}, resumed.stderr[-3000:]
  expected, _, _ = trained_run.load(str(trained))
  got, _, _ = trained_run.load(str(tmp_path))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)


def test_eval_mode_rebuilds_outputs(trained, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(trained, workdir)
  for name in ('metrics.json', 'roc.png'):
    (workdir / name).unlink()
  main_in_process(f'--workdir={workdir}', '--mode=eval')
  assert (workdir / 'roc.png').is_file()
  written = json.loads((workdir / 'metrics.json').read_text())
  original = json.loads((trained / 'metrics.json').read_text())
  assert written['final']['auroc'] == pytest.approx(original['final']['auroc'], abs=1e-4)
  # metrics.json was deleted: the training history comes from the checkpoint.
  assert written['history'][:EPOCHS] == original['history']
  assert len(written['history']) == EPOCHS + 1 and written['final']['checkpoint'] == 'latest'


def test_score_mode_writes_csv_and_maps(trained, tmp_path, rng):
  images = tmp_path / 'images'
  images.mkdir()
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(images / f'{i}.png')
  main_in_process(f'--workdir={trained}', '--mode=score', f'--images={images}', '--maps')
  # (--verbosity showing the libraries' logs again: test_kill_and_resume_*'s resumed run.)
  rows = (trained / 'scores.csv').read_text().splitlines()
  assert rows[0] == 'path,score,normalised_score,anomalous,score_kind' and len(rows) == 4
  assert all(r.split(',')[3] in ('yes', 'no') for r in rows[1:])
  assert len(os.listdir(trained / 'anomaly_maps')) == 6  # A map and an overlay per image.
  for name in ('1.png', '2.png'):
    (images / name).unlink()
  main_in_process(f'--workdir={trained}', '--mode=score', f'--images={images}', '--maps')
  assert len(os.listdir(trained / 'anomaly_maps')) == 2  # The earlier folder's PNGs are gone.


def test_corrupt_checkpoint_is_named(trained, tmp_path):
  workdir = tmp_path / 'corrupt'
  shutil.copytree(trained, workdir)
  step_dir = workdir / 'checkpoints' / str(EPOCHS * STEPS)
  for path in (step_dir / 'state' / 'd').iterdir():
    path.unlink()
  with pytest.raises(checkpointing.CheckpointError, match=str(step_dir)):
    trained_run.load(str(workdir))


def test_mismatched_config_is_named(trained, tmp_path, digits_npz):
  workdir = tmp_path / 'mismatch'
  shutil.copytree(trained, workdir)
  config = digits_config(digits_npz)
  config.model.ngf = 16  # Another width than the checkpoint's.
  with pytest.raises(checkpointing.CheckpointError, match='expected shape'):
    train.train_and_evaluate(config, str(workdir))


def test_non_finite_loss_stops_loudly(tmp_path, progress_bars, digits_npz):
  config = digits_config(digits_npz)
  config.loss.w_con = 1e300  # Finite (a valid config), but inf in float32: so is the loss.
  config.num_epochs, config.max_steps_per_epoch, config.log_every_steps = 1, 2, 1
  with pytest.raises(train.DivergenceError, match='step 1'):
    train.train_and_evaluate(config, str(tmp_path))
  assert progress_bars and all(bar.closed for bar in progress_bars)


def test_misspelled_config_key_is_an_error(tmp_path):
  # (ml_collections raises AttributeError: 'num_epoch' ... Did you mean "num_epochs"?)
  with pytest.raises((flags.Error, AttributeError), match='num_epoch'):
    main_in_process(CONFIG, f'--workdir={tmp_path}', '--config.num_epoch=3')


def test_bad_config_value_is_named_not_traced(tmp_path):
  # A UsageError: app.run prints its message and exits 2, without a traceback.
  with pytest.raises(app.UsageError) as info:
    main_in_process(CONFIG, f'--workdir={tmp_path}', '--config.optim.lr=-1')
  assert 'config.optim.lr must be a finite number > 0; got -1.0' in str(info.value)
  assert not (tmp_path / 'checkpoints').exists()


def test_latent_knn_by_name_stores_the_bank(knn_run):
  # In process (no subprocess): 1 epoch of 2 steps with the latent k-NN score (conftest).
  tmp_path, report = knn_run.workdir, knn_run.report
  assert report['auroc'] == report['latent_knn_auroc']
  params, config, _ = trained_run.load(str(tmp_path))
  # The stored bank is the unit-norm codes of exactly the training normals.
  splits = input_pipeline.load_splits(config_lib.specs(config).data)
  no_bank = {k: v for k, v in params.items() if k != 'knn_bank'}
  codes = np.asarray(skipganomaly_jax.score_details(no_bank, splits.train)['code'], np.float64)
  codes /= np.linalg.norm(codes, axis=1, keepdims=True)
  np.testing.assert_allclose(params['knn_bank'], codes, atol=1e-5)
  paper = np.asarray(skipganomaly_jax.score_details(params, splits.test)['paper_score'])
  assert metrics.auroc(splits.test_labels, paper) == pytest.approx(
    report['paper_score_auroc'], abs=1e-4
  )
  assert json.loads((tmp_path / 'metrics.json').read_text())['score_kind'] == 'latent_knn'


def test_unknown_score_kind_is_an_error(tmp_path):
  config = tiny(load_config('demo'))
  config.score_kind = 'knn'
  allowed = "\\('latent_knn', 'paper', 'map_max', 'map_topk'\\); got 'knn'"
  with pytest.raises(ValueError, match=f'score_kind must be one of {allowed}'):
    train.train_and_evaluate(config, str(tmp_path))
