"""A GANomaly run end to end: trained, loaded, and scored by the same functions as Skip-GANomaly.

One tiny run (the session's `ganomaly_run`: 500 offline digits, model.name = 'ganomaly',
ngf = ndf = 8, nz = 16, one epoch of 2 steps, latent k-NN score) trained by
`train.train_and_evaluate`; `load` reads it back as a GANomaly model, and `score_fn` is
checked against the GANomaly score and the latent k-NN score written out here from the
networks' outputs (numpy, float64). The same run preempted by SIGTERM after its first
step and resumed ends bitwise where the uninterrupted one ends.
"""

import json
import os
import signal

import jax
import numpy as np
import pytest

import skipganomaly_jax
from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import sources
from skipganomaly_jax.nets.ganomaly import GanomalyDiscriminator, GanomalyGenerator
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring import localisation, scores
from skipganomaly_jax.training import checkpointing, train

NGF, NZ = 8, 16


@pytest.fixture(scope='module')
def run(ganomaly_run):
  """(workdir, training report) of the session's GANomaly run (conftest.ganomaly_run)."""
  return ganomaly_run.workdir, ganomaly_run.report


@pytest.fixture(scope='module')
def loaded(run):
  return skipganomaly_jax.load(str(run[0]))


@pytest.fixture(scope='module')
def digits():
  """A few real digits, uint8 (N, 32, 32, 1), of several classes."""
  pool = sources.mnist_offline_pool(32, 1, seed=0)
  pick = [int(np.flatnonzero(pool.labels == c)[0]) for c in range(6)]
  return pool.images[pick]


def networks_on(params, images):
  """Eval-mode G and D outputs of uint8 images, from the modules themselves."""
  x = images.astype(np.float32) / 127.5 - 1.0
  g = GanomalyGenerator(32, 1, NGF, NZ)
  d = GanomalyDiscriminator(32, 1, NGF)
  fake, latent_i, latent_o = g.apply(params['generator'], x, train=False)
  _, f_real = d.apply(params['discriminator'], x, train=False)
  _, f_fake = d.apply(params['discriminator'], fake, train=False)
  as64 = lambda a: np.asarray(a, np.float64)
  return x, as64(fake), as64(latent_i), as64(latent_o), as64(f_real), as64(f_fake)


def test_the_run_trains_and_reports_both_scores(run):
  workdir, report = run
  assert report['score_kind'] == 'latent_knn' and report['auroc'] == report['latent_knn_auroc']
  for key in ('paper_score_auroc', 'latent_knn_auroc'):
    assert 0.0 <= report[key] <= 1.0, (key, report)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_keys = set().union(*(r for r in records if 'train/g_loss' in r))
  # GANomaly's loss terms, not Skip-GANomaly's.
  assert {'train/g_adv', 'train/g_con', 'train/g_enc', 'train/d_loss'} <= train_keys
  assert 'train/g_lat' not in train_keys and 'train/d_lat' not in train_keys


def test_load_knows_the_model(loaded):
  params, config, calibration = loaded
  assert config.model.name == 'ganomaly' and calibration is not None
  spec = ModelSpec.from_variables(params)
  assert spec == ModelSpec.from_settings(config_lib.specs(config).model)
  assert (spec.name, spec.ngf, spec.ndf, spec.nz, spec.nc, spec.code_size) == (
    'ganomaly',
    NGF,
    NGF,
    NZ,
    1,
    NZ,
  )
  assert 'encoder1' in params['generator']['params']
  bank = np.asarray(params['knn_bank'])
  assert bank.shape[1] == NZ  # encoder1's codes.
  np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-5)


def test_score_fn_is_the_ganomaly_score(loaded, digits):
  """Without the bank, score_fn's score is GANomaly's: mean over the code of
  (latent_i - latent_o)^2; score_details' terms are as documented."""
  params = {k: v for k, v in loaded[0].items() if k != 'knn_bank'}
  _, fake, latent_i, latent_o, f_real, f_fake = networks_on(params, digits)
  want = np.mean(np.square(latent_i - latent_o), axis=1)
  ours = np.asarray(skipganomaly_jax.score_fn(params, digits), np.float64)
  np.testing.assert_allclose(ours, want, rtol=1e-5)  # Measured 1.4e-7.
  details = skipganomaly_jax.score_details(params, digits)
  np.testing.assert_allclose(details['paper_score'], want, rtol=1e-5)
  np.testing.assert_allclose(details['code'], latent_i, rtol=1e-5, atol=1e-7)
  x = digits.astype(np.float64) / 127.5 - 1.0
  np.testing.assert_allclose(
    details['rec'], np.mean(np.square(x - fake), axis=(1, 2, 3)), rtol=1e-4, atol=1e-9
  )
  np.testing.assert_allclose(
    details['lat'], np.mean(np.square(f_real - f_fake), axis=1), rtol=1e-4, atol=1e-9
  )


def test_latent_knn_scores_compare_encoder1_codes(loaded, digits):
  """The run's score: 1 - mean cosine similarity of encoder1's code to its 5 nearest
  bank codes, written out in float64 (as |a - b|^2 / 2 of unit vectors)."""
  params = loaded[0]
  _, _, latent_i, _, _, _ = networks_on(params, digits)
  bank = np.asarray(params['knn_bank'], np.float64)
  codes = latent_i / np.linalg.norm(latent_i, axis=1, keepdims=True)
  squared = np.sum(np.square(codes[:, None, :] - bank[None]), axis=-1)
  want = 0.5 * np.mean(np.sort(squared, axis=1)[:, : config_lib.KNN_K], axis=1)
  ours = np.asarray(skipganomaly_jax.score_fn(params, digits), np.float64)
  np.testing.assert_allclose(ours, want, rtol=1e-4)  # Measured 9e-7.
  assert np.all(ours >= 0.0)


def test_score_maps_give_the_reconstruction_error(loaded, digits):
  params = loaded[0]
  scores_, maps = skipganomaly_jax.score_maps(params, digits)
  _, fake, *_ = networks_on(params, digits)
  x = digits.astype(np.float64) / 127.5 - 1.0
  assert maps.shape == (len(digits), 32, 32) and np.all(np.isfinite(maps))
  np.testing.assert_allclose(maps, np.mean(np.square(x - fake), axis=-1), rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(scores_, skipganomaly_jax.score_fn(params, digits))
  # Under jit too, and with D's feature maps beside it (localisation's 'rec+d' terms).
  jitted = jax.jit(skipganomaly_jax.score_maps)(params, digits)
  np.testing.assert_allclose(jitted[1], maps, rtol=1e-5, atol=1e-9)
  terms = localisation.map_terms(params, digits, d_levels=2)
  assert terms['rec'].shape == terms['d'].shape == (len(digits), 32, 32)
  np.testing.assert_allclose(terms['rec'], maps, rtol=1e-5, atol=1e-9)


def test_a_bank_of_the_wrong_code_size_is_named(loaded, digits):
  params = {**loaded[0], 'knn_bank': np.zeros((8, 8 * NGF), np.float32)}  # Skip-GANomaly's.
  with pytest.raises(ValueError, match=rf'must be \(M >= 5, {NZ}\)'):
    skipganomaly_jax.score_fn(params, digits)
  empty = skipganomaly_jax.score_details(loaded[0], digits[:0])
  assert empty['code'].shape == (0, NZ) and empty['score'].shape == (0,)
  assert scores.score_fn(loaded[0], digits[:0]).shape == (0,)


def stored_states(workdir, step: int) -> dict:
  """Everything checkpointed at `step`: G's and D's params, BatchNorm statistics,
  optimizer states and step counts, and the k-NN bank (as plain arrays)."""
  with checkpointing.Checkpointer(workdir / 'checkpoints') as ckpt:
    state, meta = ckpt.restore(step, ckpt.abstract_state(step))
  return jax.device_get(state), meta


def test_preempted_and_resumed_equals_the_uninterrupted_run(
  ganomaly_run, tmp_path, monkeypatch, progress_bars
):
  """SIGTERM after step 1 of 2 (a real signal to this process, handled by the training's
  preemption flag): a checkpoint of step 1 and no evaluation; the same call again resumes
  there, and its step-2 checkpoint (networks, optimizer states, bank) and report equal
  `ganomaly_run`'s, which trained the same config without a stop."""
  config = ganomaly_run.config.copy_and_resolve_references()
  config.log_every_steps = 1  # So that the hook below sees step 1 (no effect on training).
  logged = train.check_and_log

  def sigterm_after_step_1(ctx, pending, pbar, tick):
    logged(ctx, pending, pbar, tick)
    if pending and pending[-1][0] == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train, 'check_and_log', sigterm_after_step_1)
  assert train.train_and_evaluate(config, str(tmp_path)) == {}  # Preempted: no evaluation.
  with checkpointing.Checkpointer(tmp_path / 'checkpoints') as ckpt:
    assert ckpt.all_steps() == [1]
    meta = ckpt.restore_meta()
  assert meta['data_iterator'] == {'epoch': 0, 'step_in_epoch': 1}
  assert meta['calibration'] is None and meta['history'] == []
  monkeypatch.setattr(train, 'check_and_log', logged)
  report = train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  # Resumed at step 2: no step trained twice (a restart from scratch would log 1 again).
  assert [r['step'] for r in records if 'train/g_loss' in r] == [1, 2]
  got, got_meta = stored_states(tmp_path, 2)
  want, want_meta = stored_states(ganomaly_run.workdir, 2)
  assert set(got) == set(want) == {'g', 'd', 'knn_bank'}
  assert 'opt_state' in got['g'] and 'encoder2' in got['g']['params']
  # Bitwise: the same compiled step on the same batches and keys.
  jax.tree.map(np.testing.assert_array_equal, got, want)
  end_of_epoch = {'epoch': 1, 'step_in_epoch': 0}
  assert got_meta['data_iterator'] == want_meta['data_iterator'] == end_of_epoch
  assert got_meta['calibration'] == want_meta['calibration']
  for key in ('auroc', 'paper_score_auroc', 'latent_knn_auroc', 'step', 'epoch'):
    assert report[key] == ganomaly_run.report[key], key
  assert progress_bars and all(bar.closed for bar in progress_bars)
