"""Runs written before the package moved into subpackages still load and score the same.

`tests/data/old_layout_run` was trained and exported by the flat layout (see its
README.md); its `expected_scores.npz` holds that code's scores of six random images.
"""

import pathlib
import shutil

import numpy as np
import pytest

import skipganomaly_jax
from skipganomaly_jax import score_details, score_fn
from skipganomaly_jax.deploy import detector
from skipganomaly_jax.training import checkpointing

OLD_RUN = pathlib.Path(__file__).resolve().parent / 'data' / 'old_layout_run'


@pytest.fixture(scope='module')
def old_run(tmp_path_factory):
  """A writable copy of the old run (loading may write beside the checkpoints)."""
  copy = tmp_path_factory.mktemp('old') / 'run'
  shutil.copytree(OLD_RUN, copy)
  return copy


@pytest.fixture(scope='module')
def expected():
  return dict(np.load(OLD_RUN / 'expected_scores.npz'))


def test_old_checkpoint_loads_and_scores_as_before(old_run, expected):
  params, config, calibration = skipganomaly_jax.load(str(old_run))
  assert config.score_kind == 'latent_knn' and 'knn_bank' in params
  assert calibration.threshold == pytest.approx(float(expected['threshold']), rel=1e-12)
  np.testing.assert_allclose(
    np.asarray(score_fn(params, expected['images'])), expected['latent_knn'], rtol=1e-5
  )
  paper = score_details(params, expected['images'])['paper_score']
  np.testing.assert_allclose(np.asarray(paper), expected['paper'], rtol=1e-5)


def test_old_exported_detector_loads_and_scores_as_before(old_run, expected):
  exported = detector.load_exported(str(old_run / 'export'))
  np.testing.assert_allclose(exported.score(expected['images']), expected['latent_knn'], rtol=1e-5)


def test_best_is_refused_for_a_latent_knn_run(old_run):
  """Latent k-NN distances do not rank checkpoints: 'best' says so instead of picking one."""
  with pytest.raises(checkpointing.CheckpointError, match="--checkpoint=best .* 'latent_knn'"):
    skipganomaly_jax.load(str(old_run), 'best')
