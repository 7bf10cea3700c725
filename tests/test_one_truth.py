"""One truth: a run's score is the same number wherever it is computed.

For every score kind of both models, on the same images: the scores of the run's own
evaluation (what it stored: the calibration's min, max and threshold of the validation
normals' scores, and the report's mean 'val_score'), `load` + `score_fn`, the scores.csv
of `--mode=score` and the exported StableHLO detector (ONNX too where jax2onnx is
installed) agree to RTOL, and every decision is the calibration's.

Runs: one tiny run per model (widths 8, 1 epoch of 2 steps, latent k-NN): the session's
`knn_run` and `ganomaly_run` (conftest.py). Training does not depend on the score kind
(the step reads no score setting), so each other case is that run's networks evaluated
as a run of its own config: its checkpoint with the epoch's evaluation removed, resumed
by `train.train_and_evaluate`, which evaluates the epoch the run's way and saves the
calibration, map scale and outputs, as at the end of any epoch (seconds instead of a
training each). Map scores cover both maps ('rec', 'rec+d'), both map kinds and both
models (a case each: every combination is a composition of these); Skip-GANomaly's
paper score uses lam = 0.5, not the default.
RTOL 1e-5: the evaluation scores in other batches (float32, ~1e-7 relative; the latent
k-NN distance of barely trained codes amplifies it to ~5e-6), scores.csv writes 6
significant digits (at most 5e-6 relative), and the exported program is compiled for a
symbolic batch. A wrong lambda, dtype, kind, map or unit moves scores by far more.
"""

import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import digits_config, main_in_process
from PIL import Image

import skipganomaly_jax
from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.deploy import detector as detector_lib
from skipganomaly_jax.deploy import export, trained_run
from skipganomaly_jax.scoring import localisation, metrics, scores
from skipganomaly_jax.scoring.run_score import RunScore
from skipganomaly_jax.training import checkpointing, train

RTOL = 1e-5
# id: (model, score_kind, localisation.map, score_lambda).
CASES = {
  'skipganomaly-paper': ('skipganomaly', 'paper', 'rec', 0.5),
  'skipganomaly-latent_knn': ('skipganomaly', 'latent_knn', 'rec', 0.9),
  'skipganomaly-map_max-rec': ('skipganomaly', 'map_max', 'rec', 0.9),
  'skipganomaly-map_topk-rec+d': ('skipganomaly', 'map_topk', 'rec+d', 0.9),
  'ganomaly-paper': ('ganomaly', 'paper', 'rec', 0.9),
  'ganomaly-latent_knn': ('ganomaly', 'latent_knn', 'rec', 0.9),
  'ganomaly-map_max-rec+d': ('ganomaly', 'map_max', 'rec+d', 0.9),
}
TRAINED = ('skipganomaly-latent_knn', 'ganomaly-latent_knn')  # Each model's trained run.
needs_onnx = pytest.mark.skipif(
  not all(importlib.util.find_spec(m) for m in ('jax2onnx', 'onnxruntime')),
  reason=f'the ONNX extra is not installed: {export.JAX2ONNX_INSTALL}',
)


def case_config(npz: str, case: str):
  """The tiny config of `case` (conftest.digits_config: 1 epoch of 2 steps)."""
  config = digits_config(npz)
  model, kind, map_name, lam = CASES[case]
  config.model.name, config.score_kind, config.localisation.map = model, kind, map_name
  config.score_lambda = lam
  config.num_epochs, config.max_steps_per_epoch = 1, 2
  return config


@pytest.fixture(scope='session')
def workdirs() -> dict:
  """{case: workdir} of the runs that `case_workdir` has made so far (one per session)."""
  return {}


def case_workdir(request, case: str):
  """The workdir of `case`'s run (see the module doc), made once per session."""
  runs = request.getfixturevalue('workdirs')
  if case in runs:
    return runs[case]
  npz = request.getfixturevalue('digits_npz')
  workdir = request.getfixturevalue('tmp_path_factory').mktemp(f'one_truth_{case}')
  model = CASES[case][0]
  trained = TRAINED[model == 'ganomaly']
  if case in TRAINED:  # A copy of the session's run: outputs stay out of the shared run.
    shutil.rmtree(workdir)
    session_run = 'ganomaly_run' if model == 'ganomaly' else 'knn_run'
    shutil.copytree(request.getfixturevalue(session_run).workdir, workdir)
  else:  # The trained run's networks, their epoch evaluated anew as this case's run.
    shutil.copytree(case_workdir(request, trained) / 'checkpoints', workdir / 'checkpoints')
    with checkpointing.Checkpointer(workdir / 'checkpoints') as ckpt:
      ckpt.update_meta(ckpt.latest_step(), {'history': []})
    report = train.train_and_evaluate(case_config(npz, case), str(workdir))
    assert report['score_kind'] == CASES[case][1] and report['epoch'] == 1
  runs[case] = workdir
  return workdir


@pytest.fixture(scope='session')
def images_folder(tmp_path_factory, digits_npz):
  """(folder of PNGs, their uint8 images): the validation normals, then 4 normal and 4
  abnormal test digits (every run here has the same data and split)."""
  splits = input_pipeline.load_splits(config_lib.specs(digits_config(digits_npz)).data)
  test = splits.test[np.r_[0:4, len(splits.test) - 4 : len(splits.test)]]
  images = np.concatenate([splits.val, test])
  folder = tmp_path_factory.mktemp('one_truth_images')
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0]).save(folder / f'{i:03d}.png')
  return folder, images


@pytest.fixture(scope='session', params=list(CASES))
def truth(request, images_folder):
  """Every source's scores of one case's run, computed once: a dict."""
  case = request.param
  workdir = case_workdir(request, case)
  folder, images = images_folder
  params, config, calibration = skipganomaly_jax.load(str(workdir))
  main_in_process(f'--workdir={workdir}', '--mode=score', f'--images={folder}')
  rows = [line.split(',') for line in (workdir / 'scores.csv').read_text().splitlines()[1:]]
  export.export_run(str(workdir))
  exported = detector_lib.load_exported(str(workdir / 'export'), 'stablehlo')
  return {
    'case': case,
    'workdir': workdir,
    'params': params,
    'config': config,
    'calibration': calibration,
    'report': json.loads((workdir / 'metrics.json').read_text())['final'],
    'images': images,
    'score_fn': np.asarray(skipganomaly_jax.score_fn(params, images), np.float64),
    'csv': rows,
    'exported': exported,
  }


def test_the_run_is_the_case(truth):
  model, kind, map_name, lam = CASES[truth['case']]
  run = truth['params']['run_score']
  assert (run.model.name, run.kind, truth['config'].score_kind) == (model, kind, kind)
  assert run.lam == truth['config'].score_lambda == lam
  assert run.maps is None if kind in ('paper', 'latent_knn') else run.maps.map == map_name
  assert truth['report']['score_kind'] == kind


def test_score_fn_gives_the_evaluations_scores(truth):
  """The evaluation stored only statistics of its validation scores: each must be that
  of load + score_fn's scores of the same validation normals."""
  calibration = truth['calibration']
  val = truth['score_fn'][: calibration.num_val]
  assert calibration.num_val == len(truth['images']) - 8
  refit = metrics.Calibration.fit(val, calibration.percentile)
  for name in ('score_min', 'score_max', 'threshold'):
    assert getattr(refit, name) == pytest.approx(getattr(calibration, name), rel=RTOL), name
  assert np.mean(val) == pytest.approx(truth['report']['val_score'], rel=RTOL)
  flags = calibration.is_anomalous(truth['score_fn'])
  assert flags.any() and not flags.all()  # Both decisions occur on these digits.


def test_score_mode_writes_the_same_scores(truth):
  rows, calibration = truth['csv'], truth['calibration']
  assert [os.path.basename(r[0]) for r in rows] == [f'{i:03d}.png' for i in range(len(rows))]
  csv_scores = np.array([float(r[1]) for r in rows])
  np.testing.assert_allclose(csv_scores, truth['score_fn'], rtol=RTOL)
  flags = calibration.is_anomalous(truth['score_fn'])
  assert [r[3] for r in rows] == ['yes' if f else 'no' for f in flags]
  assert {r[4] for r in rows} == {truth['config'].score_kind}


def test_the_export_scores_the_same_and_names_its_score(truth):
  exported, run = truth['exported'], truth['params']['run_score']
  got = exported.score(truth['images'])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, truth['score_fn'], rtol=RTOL)
  meta = exported.metadata
  assert meta['score_kind'] == run.kind == truth['config'].score_kind
  assert meta['score'] == json.loads(json.dumps(run.describe()))
  assert meta['score']['model'] == CASES[truth['case']][0]
  if run.is_map:
    settings = truth['config'].localisation
    assert meta['score']['map']['map'] == settings.map
    assert meta['score']['map']['sigma'] == settings.sigma
  near = np.isclose(truth['score_fn'], meta['threshold'], rtol=RTOL, atol=0)
  decisions = exported.is_anomalous(got)
  expected = truth['calibration'].is_anomalous(truth['score_fn'])
  np.testing.assert_array_equal(decisions[~near], expected[~near])


@needs_onnx
def test_the_onnx_export_scores_the_same(truth):
  export.export_run(str(truth['workdir']), 'onnx')
  exported = detector_lib.load_exported(str(truth['workdir'] / 'export'), 'onnx')
  np.testing.assert_allclose(exported.score(truth['images']), truth['score_fn'], rtol=RTOL)
  assert exported.metadata['score_kind'] == truth['config'].score_kind


def test_score_details_gives_every_score(truth):
  """Every score of the run; a map score equals localisation's own (numpy) computation,
  the one the evaluation runs, on the bare networks with the stored map units."""
  params, images = truth['params'], truth['images']
  run = params['run_score']
  details = scores.score_details(params, images)
  np.testing.assert_array_equal(details['score'], truth['score_fn'])
  empty = scores.score_details(params, images[:0])
  assert {k: v.shape for k, v in empty.items()} == {
    k: (0, *v.shape[1:]) for k, v in details.items()
  }
  bare = {k: v for k, v in params.items() if k != 'run_score'}
  base = scores.score_details(bare, images, lam=run.lam)
  assert set(details) - set(base) == ({'map_max', 'map_topk'} if run.is_map else set())
  np.testing.assert_allclose(details['paper_score'], base['paper_score'], rtol=RTOL)
  if not run.is_map:  # The bank decides, as for bare params: a latent k-NN run has one.
    assert ('knn_bank' in params) == (run.kind == 'latent_knn')
    np.testing.assert_allclose(details['score'], base['score'], rtol=RTOL)
    return
  model = trained_run.restore(str(truth['workdir']))
  units = model.map_scale.terms if run.maps.map == 'rec+d' else None
  for kind in ('map_max', 'map_topk'):
    want = localisation.score_images(bare, images, kind, run.maps, units)['score']
    np.testing.assert_allclose(details[kind], want, rtol=RTOL)
  np.testing.assert_array_equal(details['score'], details[run.kind])


# ----------------------------------------------------------------------------- RunScore


@pytest.fixture(scope='module')
def loaded(knn_run):
  return skipganomaly_jax.load(str(knn_run.workdir))


def test_run_score_is_a_leafless_static_node(loaded, rng):
  params = loaded[0]
  bare = {k: v for k, v in params.items() if k != 'run_score'}
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(bare))
  assert jax.tree.map(lambda a: a, params)['run_score'] is params['run_score']
  assert jax.device_put(params)['run_score'] == params['run_score']
  x = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
  want = skipganomaly_jax.score_fn(params, x)
  np.testing.assert_allclose(jax.jit(skipganomaly_jax.score_fn)(params, x), want, rtol=RTOL)


def test_lambda_and_dtype_are_the_runs_and_lam_overrides(loaded, rng):
  """A RunScore's lam and dtype are used (here bfloat16, lam 0.3: against score_terms
  and the float32 terms written out); bare params keep lam 0.9 and float32; lam= wins."""
  params, config, _ = loaded
  assert params['run_score'].lam == config.score_lambda
  x = rng.integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
  bare = {k: params[k] for k in ('generator', 'discriminator')}  # No bank: the paper score.
  terms = scores.score_details(bare, x)
  rec, lat = np.asarray(terms['rec'], np.float64), np.asarray(terms['lat'], np.float64)
  np.testing.assert_allclose(terms['score'], 0.9 * rec + 0.1 * lat, rtol=1e-6)
  run = RunScore(params['run_score'].model, lam=0.3, dtype='bfloat16')
  mine = {**bare, 'run_score': run}
  x_float = x.astype(np.float32) / 127.5 - 1.0
  spec = scores.check_params(bare)
  terms_fn = jax.jit(scores.score_terms, static_argnames=('spec', 'dtype'))
  bf16 = terms_fn(bare, x_float, 0.3, spec, dtype=jax.numpy.bfloat16)['score']
  np.testing.assert_allclose(skipganomaly_jax.score_fn(mine, x), bf16, rtol=1e-6)
  np.testing.assert_allclose(skipganomaly_jax.score_fn(mine, x), 0.3 * rec + 0.7 * lat, rtol=0.05)
  float32 = {**bare, 'run_score': dataclasses.replace(run, dtype='float32')}
  np.testing.assert_allclose(
    skipganomaly_jax.score_fn(float32, x), 0.3 * rec + 0.7 * lat, rtol=1e-5
  )
  overridden = skipganomaly_jax.score_fn(float32, x, lam=0.5)
  np.testing.assert_allclose(overridden, 0.5 * rec + 0.5 * lat, rtol=1e-5)


def test_a_wrong_run_score_is_refused(loaded):
  params, x = loaded[0], np.zeros((1, 32, 32, 1), np.uint8)
  run = params['run_score']
  other = {
    **params,
    'run_score': dataclasses.replace(run, model=dataclasses.replace(run.model, ngf=16)),
  }
  with pytest.raises(ValueError, match='belong to another run'):
    skipganomaly_jax.score_fn(other, x)
  with pytest.raises(TypeError, match=r"params\['run_score'\] must be"):
    skipganomaly_jax.score_fn({**params, 'run_score': 'paper'}, x)
  with pytest.raises(ValueError, match=r"'rec\+d' map is in units"):
    RunScore(run.model, kind='map_max', maps=config_lib.LocalisationSpec(map='rec+d'))


def test_a_rec_d_checkpoint_without_its_map_scale_says_how_to_store_it(request, tmp_path):
  """Scoring a 'rec+d' map run needs the units stored at evaluation: load and export name
  the fix (--mode=eval once) instead of scoring in other units."""
  workdir = tmp_path / 'old'
  shutil.copytree(case_workdir(request, 'skipganomaly-map_topk-rec+d'), workdir)
  with checkpointing.Checkpointer(workdir / 'checkpoints') as ckpt:
    ckpt.update_meta(ckpt.latest_step(), {'map_scale': None})
  for call in (
    lambda: skipganomaly_jax.load(str(workdir)),
    lambda: export.export_run(str(workdir)),
  ):
    with pytest.raises(checkpointing.CheckpointError, match='no stored map scale.*--mode=eval'):
      call()
