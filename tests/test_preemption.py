"""SIGTERM (a preemption notice) through main.py: a checkpoint at the current step, exit 0,
and a rerun of the same command resumes there and ends where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY

from skipganomaly_jax import api, checkpointing

STEPS = 20  # One epoch; SIGTERM arrives after the first step.
TIMEOUT_S = 300
FLAGS = [f'--config.{k}={v}' for k, v in TINY.items()] + [
  '--config.num_epochs=1',
  f'--config.max_steps_per_epoch={STEPS}',
  '--config.log_every_steps=1',
  '--config.eval_batch_size=512',
]


def main_cmd(workdir):
  return [
    sys.executable,
    str(ROOT / 'main.py'),
    '--config=configs/demo.py',
    f'--workdir={workdir}',
    *FLAGS,
  ]


def start(workdir):
  log = open(workdir.parent / f'{workdir.name}.log', 'a')  # noqa: SIM115
  try:
    return subprocess.Popen(main_cmd(workdir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
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
def runs(tmp_path_factory):
  """(uninterrupted, preempted): workdirs; the preempted one after SIGTERM only."""
  base = tmp_path_factory.mktemp('preemption')
  full, preempted = base / 'full', base / 'preempted'
  full.mkdir(), preempted.mkdir()
  procs = []
  try:
    procs.append(start(full))
    procs.append(start(preempted))
    uninterrupted, proc = procs
    deadline = time.time() + TIMEOUT_S
    while not train_steps(preempted):
      assert proc.poll() is None, f'exited early:\n{(base / "preempted.log").read_text()[-3000:]}'
      assert time.time() < deadline, 'no training step was logged'
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, (base / 'preempted.log').read_text()[-3000:]
    assert finish(uninterrupted) == 0, (base / 'full.log').read_text()[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return full, preempted


@pytest.fixture(scope='module')
def saved_step(runs):
  with checkpointing.Checkpointer(runs[1] / 'checkpoints') as ckpt:
    return ckpt.latest_step()


def test_sigterm_saves_a_mid_epoch_checkpoint_and_exits_0(runs, saved_step):
  _, preempted = runs
  assert saved_step is not None and 0 < saved_step < STEPS, saved_step
  log = (preempted.parent / 'preempted.log').read_text()
  assert f'Preempted: saved step {saved_step}' in log
  assert train_steps(preempted) == list(range(1, saved_step + 1))
  assert not (preempted / 'metrics.json').exists()  # Stopped before the evaluation.
  with checkpointing.Checkpointer(preempted / 'checkpoints') as ckpt:
    meta = ckpt.restore_meta()
  assert meta['data_iterator'] == {'epoch': 0, 'step_in_epoch': saved_step}


def test_rerun_resumes_and_equals_uninterrupted(runs, saved_step):
  full, preempted = runs
  assert finish(start(preempted)) == 0, (preempted.parent / 'preempted.log').read_text()[-3000:]
  log = (preempted.parent / 'preempted.log').read_text()
  assert f'Resumed from {preempted / "checkpoints" / str(saved_step)}' in log
  assert train_steps(preempted) == list(range(1, STEPS + 1))  # No step twice or skipped.
  with checkpointing.Checkpointer(preempted / 'checkpoints') as ckpt:
    assert ckpt.latest_step() == STEPS
  expected, _, _ = api.load(str(full))
  got, _, _ = api.load(str(preempted))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, expected)
  reports = [json.loads((d / 'metrics.json').read_text())['final'] for d in (full, preempted)]
  assert reports[1]['auroc'] == pytest.approx(reports[0]['auroc'], abs=1e-6)
