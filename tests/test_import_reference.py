"""Importing the reference's weights: the port's checks, and checkpoints that score like it.

The state dicts are the parity fixture's initial weights (tests/data), whose eval-mode
paper score of x0 the reference computed; an imported checkpoint must reproduce it.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import parity_helpers
import pytest
from conftest import ROOT
from parity_helpers import load_fixture, nhwc, relative, state_dict
from PIL import Image
from test_reference_parity import FIXTURE, FORWARD_RTOL, SPEC

import skipganomaly_jax
from skipganomaly_jax.deploy import import_reference, run_modes
from skipganomaly_jax.nets import torch_weights
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring import scores


@pytest.fixture(scope='module')
def ref():
  return load_fixture(FIXTURE)


def import_config(dataset: str = 'mnist_offline'):
  """The offline digits as RGB, with the fixture's architecture."""
  return parity_helpers.import_config(SPEC, dataset)


def paper_score_of_x0(workdir, ref):
  params, config, calibration = skipganomaly_jax.load(str(workdir))
  details = scores.score_details(params, np.asarray(nhwc(ref['x0'])))
  return relative(details['paper_score'], ref['init_eval/score']), params, config, calibration


# ---- The port's checks ----------------------------------------------------------------------


def test_port_names_key_and_shapes(ref):
  g, d = state_dict(ref, 'init', 'G'), state_dict(ref, 'init', 'D')
  key = 'feat.pyramid-16-32-conv.weight'
  bad = {**d, key: np.zeros((32, 16, 3, 3), np.float32)}
  with pytest.raises(
    ValueError,
    match=r"'feat.pyramid-16-32-conv.weight': expected shape "
    r'\(32, 16, 4, 4\), got shape \(32, 16, 3, 3\)',
  ):
    torch_weights.convert_state_dicts(g, bad, SPEC)
  missing = {k: v for k, v in g.items() if k != 'model.model.3.bias'}
  with pytest.raises(ValueError, match=r"missing key 'model.model.3.bias' \(expected shape \(3,\)"):
    torch_weights.convert_state_dicts(missing, d, SPEC)
  with pytest.raises(ValueError, match=r"unexpected key 'extra.weight' \(shape \(2,\)\)"):
    torch_weights.convert_state_dicts({**g, 'extra.weight': np.ones(2)}, d, SPEC)
  # A config with another width names the keys it cannot find.
  with pytest.raises(ValueError, match="missing key 'feat.initial-conv-3-16.weight'"):
    torch_weights.convert_state_dicts(g, d, ModelSpec(ngf=8, ndf=16, nz=10))


def test_port_accepts_data_parallel_prefix_and_counters(ref):
  """The reference on GPU wraps its nets in DataParallel ('module.' keys); torch stores
  num_batches_tracked with every BatchNorm."""
  g, d = state_dict(ref, 'init', 'G'), state_dict(ref, 'init', 'D')
  plain = torch_weights.convert_state_dicts(g, d, SPEC)
  wrapped = {f'module.{k}': v for k, v in g.items()}
  wrapped['module.model.model.1.model.2.num_batches_tracked'] = np.array(7)
  other = torch_weights.convert_state_dicts(wrapped, d, SPEC)
  jax.tree.map(np.testing.assert_array_equal, plain, other)


# ---- Checkpoints ----------------------------------------------------------------------------


def test_import_without_dataset_scores_like_the_reference(ref, tmp_path):
  netg, netd = state_dict(ref, 'init', 'G'), state_dict(ref, 'init', 'D')
  config = import_config('missing')
  report = import_reference.import_state_dicts(config, str(tmp_path), netg, netd)
  assert report == {}
  error, params, stored, calibration = paper_score_of_x0(tmp_path, ref)
  assert error < FORWARD_RTOL
  assert calibration is None and 'knn_bank' not in params and stored.score_kind == 'paper'
  assert json.loads((tmp_path / import_reference.IMPORT_RECORD).read_text())['report'] == {}
  # The paper score is then score_fn's score.
  scores = skipganomaly_jax.score_fn(params, np.asarray(nhwc(ref['x0'])))
  assert relative(scores, ref['init_eval/score']) < FORWARD_RTOL
  with pytest.raises(ValueError, match='already holds checkpoints'):
    import_reference.import_state_dicts(config, str(tmp_path), netg, netd)


def test_pth_import_calibrates_and_scores(ref, tmp_path):
  """The command line on .pth files (written with torch), then score mode on images."""
  torch = pytest.importorskip('torch')
  paths = {}
  for net in ('G', 'D'):
    blob = {k: torch.from_numpy(v) for k, v in state_dict(ref, 'init', net).items()}
    paths[net] = tmp_path / f'net{net}.pth'
    torch.save({'epoch': 4, 'state_dict': blob}, paths[net])
  workdir = tmp_path / 'imported'
  flags = [f'--config.{k}={v}' for k, v in (('nc', 3), ('model.ngf', 8), ('model.ndf', 8))]
  flags += [
    '--config.model.nz=10',
    '--config.eval_batch_size=512',
    '--config.score_kind=latent_knn',
  ]
  cmd = [
    sys.executable,
    '-m',
    'skipganomaly_jax.import_reference',
    '--config=configs/demo.py',
  ]
  cmd += [f'--netg={paths["G"]}', f'--netd={paths["D"]}', f'--workdir={workdir}', *flags]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'calibrated on the validation normals' in proc.stdout
  error, params, config, calibration = paper_score_of_x0(workdir, ref)
  assert error < FORWARD_RTOL
  assert calibration is not None and params['knn_bank'].shape[1] == 8 * SPEC.ngf
  assert config.score_kind == 'latent_knn'
  record = json.loads((workdir / import_reference.IMPORT_RECORD).read_text())
  report = record['report']
  assert record['source']['reference_epoch'] == 4
  assert report['auroc'] == report['latent_knn_auroc'] and 'paper_score_auroc' in report
  images = tmp_path / 'images'
  images.mkdir()
  for i, x in enumerate(ref['x0'][:3]):
    pixels = np.round((x.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
    Image.fromarray(pixels).save(images / f'{i}.png')
  with open(run_modes.score_path(str(workdir), str(images))) as f:
    rows = f.read().splitlines()
  assert rows[0] == 'path,score,normalised_score,anomalous,score_kind' and len(rows) == 4


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError.
  with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
    import_reference.read_pth(str(tmp_path / 'netG.pth'))
