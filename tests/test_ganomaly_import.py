"""Importing the GANomaly authors' weights (netG.pth, netD.pth) with model.name = 'ganomaly'.

The state dicts are the GANomaly parity fixture's initial weights (tests/data, torch
names and layouts, no torch needed), whose eval-mode score of x0 the authors' test()
computed; an imported checkpoint must reproduce it.
"""

import json

import numpy as np
import parity_helpers
import pytest
from parity_helpers import load_fixture, nhwc, relative, state_dict
from test_ganomaly_parity import FIXTURE, FORWARD_RTOL, SPEC

import skipganomaly_jax
from skipganomaly_jax.deploy import import_reference
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring import scores


@pytest.fixture(scope='module')
def ref():
  return load_fixture(FIXTURE)


def import_config(dataset: str = 'mnist_offline'):
  """The offline digits as RGB, with the fixture's architecture."""
  return parity_helpers.import_config(SPEC, dataset)


def test_import_without_dataset_scores_like_the_authors(ref, tmp_path):
  netg, netd = state_dict(ref, 'init', 'G'), state_dict(ref, 'init', 'D')
  report = import_reference.import_state_dicts(import_config('missing'), str(tmp_path), netg, netd)
  assert report == {}
  params, config, calibration = skipganomaly_jax.load(str(tmp_path))
  assert config.model.name == 'ganomaly' and calibration is None and 'knn_bank' not in params
  assert ModelSpec.from_variables(params) == SPEC
  ours = skipganomaly_jax.score_fn(params, np.asarray(nhwc(ref['x0'])))
  assert relative(ours, ref['init_eval/score']) < FORWARD_RTOL
  assert json.loads((tmp_path / import_reference.IMPORT_RECORD).read_text())['report'] == {}


def test_import_calibrates_with_the_dataset(ref, tmp_path):
  """With the dataset: evaluated as after an epoch, the k-NN bank of encoder1's codes."""
  netg, netd = state_dict(ref, 'init', 'G'), state_dict(ref, 'init', 'D')
  config = import_config()
  config.score_kind = 'latent_knn'
  report = import_reference.import_state_dicts(config, str(tmp_path), netg, netd)
  assert report['auroc'] == report['latent_knn_auroc'] and 'paper_score_auroc' in report
  params, _, calibration = skipganomaly_jax.load(str(tmp_path))
  assert calibration is not None and params['knn_bank'].shape[1] == SPEC.nz
  details = scores.score_details(params, np.asarray(nhwc(ref['x0'])))
  assert relative(details['paper_score'], ref['init_eval/score']) < FORWARD_RTOL


def test_the_model_name_picks_the_port(ref, tmp_path):
  """GANomaly weights under the Skip-GANomaly port (the name left out) are refused,
  naming a key; so are Skip-GANomaly-shaped settings that the GANomaly port cannot fill."""
  netg, netd = state_dict(ref, 'init', 'G'), state_dict(ref, 'init', 'D')
  config = import_config('missing')
  config.model.name = 'skipganomaly'
  with pytest.raises(ValueError, match='key'):
    import_reference.import_state_dicts(config, str(tmp_path / 'a'), netg, netd)
  config = import_config('missing')
  config.model.nz = 12  # Not the authors' run.
  with pytest.raises(ValueError, match=r'final-32-1-conv\.weight'):
    import_reference.import_state_dicts(config, str(tmp_path / 'b'), netg, netd)
