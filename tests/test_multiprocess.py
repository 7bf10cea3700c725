"""Multi-host data parallelism on one machine: 2 processes x 2 CPU devices (jax.distributed
on localhost, gloo collectives) equal 1 process x 4 devices, through the product path
(tests/multiprocess_check.py): training steps, evaluation, Orbax save and restore by all
processes, outputs from process 0 only."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import app
from conftest import (
  DIGITS_TEST_ABNORMAL,
  DIGITS_TEST_NORMAL,
  DIGITS_VAL,
  FAST_COMPILE,
  ROOT,
  main_in_process,
)

from skipganomaly_jax.deploy import trained_run
from skipganomaly_jax.training import checkpointing

CHECK = ROOT / 'tests' / 'multiprocess_check.py'
TIMEOUT_S = 420  # All processes of both runs together (a cold compilation cache is slow).
NUM_TEST, NUM_VAL = DIGITS_TEST_NORMAL + DIGITS_TEST_ABNORMAL, DIGITS_VAL  # conftest's digits.
EVAL_BATCH = 16  # multiprocess_check.EVAL_BATCH


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  # jax_num_cpu_devices sets the device count; keep only the fast-compile flag.
  env['XLA_FLAGS'] = FAST_COMPILE
  return env


def start(
  workdir: pathlib.Path, num_processes: int, devices: int, digits: str, procs: list
) -> None:
  """Starts the processes of one run (appended to procs); their output goes to files."""
  workdir.mkdir(parents=True, exist_ok=True)
  port = free_port()
  for i in range(num_processes):
    cmd = [
      sys.executable,
      str(CHECK),
      str(workdir / 'run'),
      str(workdir),
      str(num_processes),
      str(i),
      str(devices),
      str(port),
      digits,
    ]
    with open(workdir / f'process_{i}.log', 'w') as log:
      procs.append(
        subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
      )


def wait_all(procs: list, timeout_s: float) -> None:
  """Waits until all processes ended, one failed (the others may wait for it) or timeout."""
  deadline = time.time() + timeout_s
  while any(p.poll() is None for p in procs) and time.time() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      return
    time.sleep(0.1)


def stop_all(procs: list) -> None:
  """Kills the processes still running and reaps all of them."""
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait(timeout=60)


def logs(workdir: pathlib.Path) -> str:
  return '\n'.join(
    f'--- {f.name}\n{f.read_text()[-3000:]}' for f in sorted(workdir.glob('process_*.log'))
  )


@pytest.fixture(scope='module')
def runs(tmp_path_factory, digits_npz):
  """(single, multi): output dirs of 1 process x 4 devices and 2 processes x 2 devices."""
  single, multi = tmp_path_factory.mktemp('single'), tmp_path_factory.mktemp('multi')
  procs = []
  try:
    start(single, 1, 4, digits_npz, procs)
    start(multi, 2, 2, digits_npz, procs)
    wait_all(procs, TIMEOUT_S)
  finally:
    stop_all(procs)
  codes = [p.returncode for p in procs]
  assert codes == [0, 0, 0], f'exit codes {codes}\n{logs(single)}\n{logs(multi)}'
  return single, multi


def load(out_dir: pathlib.Path, process: int = 0) -> dict:
  with np.load(out_dir / f'process_{process}.npz') as f:
    return dict(f)


def relative_error(a: dict, b: dict, prefix: str) -> float:
  """||a - b|| / ||b|| over the float leaves whose names start with prefix."""
  keys = [k for k in b if k.startswith(prefix) and b[k].dtype.kind == 'f']
  assert keys, prefix
  num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in keys)
  den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in keys)
  return float(np.sqrt(num / den))


def test_both_runs_restore_the_trained_step(runs):
  for out_dir in runs:
    out = load(out_dir)
    assert int(out['num_devices']) == 4
    assert int(out['step']) == 2 and int(out['iterator_epoch']) == 1
    with checkpointing.Checkpointer(out_dir / 'run' / 'checkpoints') as ckpt:
      assert ckpt.all_steps() == [2]


def test_params_and_adam_moments_equal_single_process(runs):
  single, multi = load(runs[0]), load(runs[1])
  assert single.keys() == multi.keys()
  for net in ('g', 'd'):
    # Adam normalises each gradient by its own magnitude, so float32 summation-order
    # noise in near-zero gradients becomes O(lr) steps (see test_multidevice.py): its
    # moments, which see the gradient itself, are the strict check; params get 1e-4.
    assert relative_error(multi, single, f'{net}.opt_state') < 1e-5, net
    assert relative_error(multi, single, f'{net}.batch_stats') < 1e-5, net
    assert relative_error(multi, single, f'{net}.params') < 1e-4, net


def test_every_process_holds_the_same_state_and_scores(runs):
  first, second = load(runs[1], 0), load(runs[1], 1)
  for key, value in first.items():
    np.testing.assert_array_equal(second[key], value, err_msg=key)


def test_eval_scores_equal_single_process(runs):
  single, multi = load(runs[0]), load(runs[1])
  # The paper score to 1e-5. The latent k-NN distance to 1e-4: after 2 steps the codes
  # are nearly parallel (distances ~5e-5, |a - b| ~1e-2 of |a|), so 1e-7 summation noise
  # in a code is ~1e-5 of the distance (measured max 1.8e-5 on 1,400 test digits, 6e-6
  # on these 140).
  for split, n in (('val', NUM_VAL), ('test', NUM_TEST)):
    for name, rtol in ((f'{split}_paper_scores', 1e-5), (f'{split}_scores', 1e-4)):
      assert n % EVAL_BATCH and multi[name].shape == (n,), name  # Padded last batch, unpadded.
      np.testing.assert_allclose(multi[name], single[name], rtol=rtol, err_msg=name)


def test_metrics_json_equals_single_process(runs):
  single, multi = (json.loads((d / 'run' / 'metrics.json').read_text())['final'] for d in runs)
  assert multi['step'] == single['step'] == 2
  assert multi['num_normal'] == DIGITS_TEST_NORMAL
  assert multi['num_abnormal'] == DIGITS_TEST_ABNORMAL
  for key in ('auroc', 'average_precision', 'threshold', 'val_score'):
    assert multi[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key


def test_only_process_0_writes_logs_and_outputs(runs):
  workdir = runs[1] / 'run'
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_steps = [r['step'] for r in records if 'train/g_loss' in r]
  eval_steps = [r['step'] for r in records if 'eval/auroc/paper' in r]
  assert train_steps == [1, 2] and eval_steps == [2], records  # Each record once.
  for name in ('roc.png', 'score_histogram.png', 'reconstructions.png'):
    assert (workdir / name).is_file(), name


def test_checkpoint_of_two_processes_loads_in_one(runs):
  """trained_run.load restores a checkpoint saved on 2 hosts x 2 devices onto this 1 device."""
  multi = load(runs[1])
  params, config, calibration = trained_run.load(str(runs[1] / 'run'))
  assert calibration is not None and config.model.ngf == 8
  assert jax.tree.leaves(params)[0].sharding.device_set == {jax.local_devices()[0]}
  for key, got in (
    ('params', params['generator']['params']),
    ('batch_stats', params['discriminator']['batch_stats']),
  ):
    net = 'g' if key == 'params' else 'd'
    leaves, _ = jax.tree_util.tree_flatten_with_path(got)
    for path, leaf in leaves:
      name = f'{net}.{key}{jax.tree_util.keystr(path)}'
      np.testing.assert_array_equal(np.asarray(leaf), multi[name], err_msg=name)


def test_eval_and_score_modes_refuse_multi_process_flags(tmp_path):
  with pytest.raises(app.UsageError, match='runs in a single process'):
    main_in_process(f'--workdir={tmp_path}', '--mode=eval', '--distributed')
  assert jax.process_count() == 1
