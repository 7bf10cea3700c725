"""Exported detectors (export.py, detector.py, examples/load_exported.py) vs score_fn.

One tiny run per score kind (widths 8), the session's (conftest.py): `knn_run` (latent
k-NN, 1 epoch of 2 steps) and `cli_run` (the paper score, trained through main.py), each
exported once per format.
Tolerance of the parity checks, rtol 1e-4: both formats compute in float32 like score_fn
but with other convolution algorithms and summation orders (onnxruntime's kernels; XLA
compiles the exported module for a symbolic batch), which moves each network output by
~1e-6 relative. The latent k-NN score of a barely trained model is a small difference of
nearly parallel unit codes (|code - neighbour| ~ 0.02), which amplifies that ~50x;
measured at most 1.4e-5 (ONNX) and 5e-6 (StableHLO) relative. A wrong weight, bank,
scaling, lam or BatchNorm mode moves scores by far more than 1e-4.
"""

import hashlib
import json
import os
import runpy
import shutil

import jax
import numpy as np
import pytest
from conftest import ROOT, main_in_process, run_isolated

import skipganomaly_jax
from skipganomaly_jax import config as config_lib
from skipganomaly_jax import score_fn
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.deploy import detector as detector_lib
from skipganomaly_jax.deploy import export

RTOL = 1e-4
BATCHES = (1, 7, 300)
KINDS = ('latent_knn', 'paper')
LOADER = ROOT / 'examples' / 'load_exported.py'


def has_onnx():
  try:
    export._jax2onnx()
    import onnxruntime  # noqa: F401, PLC0415
  except (detector_lib.ExportError, ImportError):
    return False
  return True


needs_onnx = pytest.mark.skipif(
  not has_onnx(), reason=f'the ONNX extra is not installed: {export.JAX2ONNX_INSTALL}'
)


@pytest.fixture(scope='module')
def runs(knn_run, cli_run):
  """{score_kind: workdir} of the tiny trained runs, each exported as StableHLO."""
  workdirs = {'latent_knn': str(knn_run.workdir), 'paper': str(cli_run.workdir)}
  # Through main.py's main once (the CLI's export mode), export_run for the other kind.
  main_in_process(f'--workdir={workdirs["paper"]}', '--mode=export')
  export.export_run(workdirs['latent_knn'])
  return workdirs


@pytest.fixture(scope='module')
def onnx_runs(runs):
  for workdir in runs.values():
    export.export_run(workdir, 'onnx')
  return runs


def images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)


def expected_scores(workdir, x):
  params, config, _ = skipganomaly_jax.load(workdir)
  return np.asarray(score_fn(params, x, lam=config.score_lambda))


def check_parity(workdir, fmt, seed):
  detector = detector_lib.load_exported(os.path.join(workdir, 'export'), fmt)
  for i, n in enumerate(BATCHES):
    x = images(n, seed + i)
    got = detector.score(x)
    assert got.shape == (n,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected_scores(workdir, x), rtol=RTOL)


@pytest.mark.parametrize('kind', KINDS)
def test_stablehlo_scores_equal_score_fn(runs, kind):
  check_parity(runs[kind], 'stablehlo', seed=10)


@needs_onnx
@pytest.mark.parametrize('kind', KINDS)
def test_onnx_scores_equal_score_fn(onnx_runs, kind):
  check_parity(onnx_runs[kind], 'onnx', seed=20)


def check_decisions(workdir, fmt):
  params, config, calibration = skipganomaly_jax.load(workdir)
  # Real digits: both decisions occur.
  test = input_pipeline.load_splits(config_lib.specs(config).data).test
  detector = detector_lib.load_exported(os.path.join(workdir, 'export'), fmt)
  expected = np.asarray(score_fn(params, test, lam=config.score_lambda))
  # A score within the tolerance of the threshold may go either way (rare: under 1%).
  near = np.isclose(expected, calibration.threshold, rtol=RTOL, atol=0)
  assert near.mean() < 0.01
  flags = detector.is_anomalous(detector.score(test))
  np.testing.assert_array_equal(flags[~near], calibration.is_anomalous(expected)[~near])
  assert 0 < flags.sum() < flags.size
  assert detector.metadata['calibration'] == calibration.to_dict()


@pytest.mark.parametrize('kind', KINDS)
def test_stablehlo_decisions_match_calibration(runs, kind):
  check_decisions(runs[kind], 'stablehlo')


@needs_onnx
def test_onnx_decisions_match_calibration(onnx_runs):
  check_decisions(onnx_runs['latent_knn'], 'onnx')


def test_detector_json_records_the_contract(runs):
  params, config, calibration = skipganomaly_jax.load(runs['latent_knn'])
  export_dir = os.path.join(runs['latent_knn'], 'export')
  meta = json.loads(open(os.path.join(export_dir, 'detector.json')).read())
  assert meta['input']['shape'] == [None, 32, 32, 1] and meta['input']['dtype'] == 'uint8'
  assert meta['input']['layout'] == 'NHWC' and meta['input']['value_range'] == [0, 255]
  assert meta['score_kind'] == config.score_kind == 'latent_knn'
  assert meta['threshold'] == calibration.threshold
  assert meta['model']['ngf'] == 8 and meta['model']['nc'] == 1
  assert meta['versions']['jax'] == jax.__version__
  entry = meta['models']['stablehlo']
  assert entry['bytes'] == os.path.getsize(os.path.join(export_dir, entry['file']))
  paper = json.loads(open(os.path.join(runs['paper'], 'export', 'detector.json')).read())
  assert paper['score_kind'] == 'paper'
  # Pruned to what the score needs: G's encoder and the bank, not G's decoder or D.
  g = params['generator']
  encoder = [g[c][k] for c in ('params', 'batch_stats') for k in g[c] if k.startswith('down_')]
  live = sum(np.asarray(a).nbytes for a in jax.tree.leaves([encoder, params['knn_bank']]))
  weights = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))
  assert live < entry['bytes'] < 1.1 * live < weights


def test_standalone_loader_scores_without_the_package(runs, tmp_path):
  workdir = runs['latent_knn']
  x = images(7, seed=30)
  np.save(tmp_path / 'images.npy', x)
  # The editable install makes the package importable from anywhere: block it, and keep
  # the project off sys.path (-I: no PYTHONPATH, no script or current directory; only the
  # root itself is checked, since CI's venv lives inside it).
  code = f"""
import json, runpy, sys
import numpy as np
sys.modules['skipganomaly_jax'] = None
try:
  import skipganomaly_jax
  raise SystemExit('skipganomaly_jax is importable')
except ImportError:
  pass
assert not any(p.rstrip('/') == {str(ROOT)!r} for p in sys.path), sys.path
detect, meta = runpy.run_path({str(LOADER)!r})['load_detector']({workdir + '/export'!r})
scores, anomalous = detect(np.load('images.npy'))
print(json.dumps({{'scores': scores.tolist(), 'anomalous': anomalous.tolist()}}))
"""
  out = run_isolated(code, tmp_path)
  expected = expected_scores(workdir, x)
  np.testing.assert_allclose(out['scores'], expected, rtol=RTOL)
  _, _, calibration = skipganomaly_jax.load(workdir)
  assert out['anomalous'] == calibration.is_anomalous(expected).tolist()


@pytest.fixture
def copied(runs, tmp_path):
  directory = tmp_path / 'export'
  shutil.copytree(os.path.join(runs['paper'], 'export'), directory)
  return directory


def test_truncated_model_file_is_named(copied):
  path = copied / 'scorer.stablehlo'
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(detector_lib.ExportError, match='scorer.stablehlo is truncated'):
    detector_lib.load_exported(str(copied))


def test_corrupt_model_file_is_caught_by_both_loaders(copied):
  # Same size, one flipped byte: it may still deserialize (e.g. in a weight), so only
  # the recorded sha256 tells.
  path = copied / 'scorer.stablehlo'
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(detector_lib.ExportError, match='scorer.stablehlo is corrupt'):
    detector_lib.load_exported(str(copied))
  with pytest.raises(ValueError, match='sha256'):
    runpy.run_path(str(LOADER))['load_detector'](str(copied))


def test_bad_detector_json_and_missing_files_are_named(copied, tmp_path):
  with pytest.raises(detector_lib.ExportError, match='no .*detector.json'):
    detector_lib.load_exported(str(tmp_path / 'nowhere'))
  meta = json.loads((copied / 'detector.json').read_text())
  meta['models'].pop('onnx', None)
  (copied / 'detector.json').write_text(json.dumps(meta))
  with pytest.raises(detector_lib.ExportError, match='holds no onnx model'):
    detector_lib.load_exported(str(copied), 'onnx')
  (copied / 'scorer.stablehlo').unlink()
  with pytest.raises(detector_lib.ExportError, match='scorer.stablehlo is missing'):
    detector_lib.load_exported(str(copied))
  (copied / 'detector.json').write_text('{"detector_version": 1, "mod')
  with pytest.raises(detector_lib.ExportError, match='not valid JSON'):
    detector_lib.load_exported(str(copied))


def test_wrong_images_are_rejected(runs):
  detector = detector_lib.load_exported(os.path.join(runs['paper'], 'export'))
  with pytest.raises(ValueError, match='uint8'):
    detector.score(images(2, seed=40).astype(np.float32) / 127.5 - 1)
  with pytest.raises(ValueError, match=r'shape \(N, 32, 32, 1\)'):
    detector.score(np.zeros((2, 28, 28, 1), np.uint8))


def test_unknown_format_is_an_error(runs):
  with pytest.raises(detector_lib.ExportError, match='format must be one of'):
    export.export_run(runs['paper'], 'tflite')


@needs_onnx
def test_both_formats_share_one_detector_json(onnx_runs):
  meta = detector_lib.load_exported(os.path.join(onnx_runs['paper'], 'export'), 'onnx').metadata
  assert sorted(meta['models']) == ['onnx', 'stablehlo']


def test_file_that_does_not_deserialize_is_named(copied):
  # A file that matches its (rewritten) sha256 but is not a serialized module.
  data = (copied / 'scorer.stablehlo').read_bytes()[:1000]
  (copied / 'scorer.stablehlo').write_bytes(data)
  meta = json.loads((copied / 'detector.json').read_text())
  meta['models']['stablehlo'] |= {'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
  (copied / 'detector.json').write_text(json.dumps(meta))
  with pytest.raises(detector_lib.ExportError, match='scorer.stablehlo does not load'):
    detector_lib.load_exported(str(copied))
