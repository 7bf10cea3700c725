"""Localisation maps, map scores and the end-to-end report with masks (tiny model)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, tiny
from scipy import ndimage
from sklearn import metrics as skm

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline, textures
from skipganomaly_jax.data import splits as splits_lib
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.reporting import overlays
from skipganomaly_jax.scoring import localisation, scores
from skipganomaly_jax.training import train, training_step


@pytest.mark.parametrize('sigma', [0.0, 0.6, 1.0, 2.5])
def test_gaussian_filter_matches_scipy(rng, sigma):
  maps = rng.normal(size=(3, int(rng.integers(12, 30)), int(rng.integers(12, 30))))
  got = np.asarray(localisation.gaussian_filter(maps, sigma))
  want = np.stack([ndimage.gaussian_filter(m, sigma, mode='reflect', truncate=4.0) for m in maps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_image_scores(rng):
  maps = rng.normal(size=(5, 16, 16))
  np.testing.assert_array_equal(localisation.image_scores(maps, 'map_max'), [m.max() for m in maps])
  for fraction in (0.01, 0.1, 1.0):
    k = int(np.ceil(fraction * 256))
    want = [np.sort(m.ravel())[::-1][:k].mean() for m in maps]
    np.testing.assert_allclose(localisation.image_scores(maps, 'map_topk', fraction), want)
  with pytest.raises(ValueError, match='Unknown map score'):
    localisation.image_scores(maps, 'mean')


def test_settings_errors():
  with pytest.raises(ValueError, match='localisation.map'):
    localisation.Settings(map='d')
  with pytest.raises(ValueError, match='sigma'):
    localisation.Settings(sigma=-1.0)
  with pytest.raises(ValueError, match='topk_fraction'):
    localisation.Settings(topk_fraction=0.0)
  config = load_config('default')
  config.localisation.sigma = 2.0
  assert config_lib.specs(config).localisation == localisation.Settings(sigma=2.0)


@pytest.fixture(scope='module')
def params():
  config = tiny(load_config('default'))
  config.nc = 3
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  g, d = training_step.create_train_states(spec, jax.random.key(0))
  return scores.scoring_variables(g, d)


def _bilinear_up2(a: np.ndarray, size: int) -> np.ndarray:
  """(N, h, w) -> (N, size, size), half-pixel centres, edges clamped (plain numpy)."""
  coords = np.clip((np.arange(size) + 0.5) * a.shape[1] / size - 0.5, 0, a.shape[1] - 1)
  lo = np.floor(coords).astype(int)
  hi, w = np.minimum(lo + 1, a.shape[1] - 1), coords - np.floor(coords)
  rows = a[:, lo] * (1 - w)[None, :, None] + a[:, hi] * w[None, :, None]
  return rows[:, :, lo] * (1 - w) + rows[:, :, hi] * w


def test_map_terms_match_independent_computation(params, rng):
  images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
  terms = localisation.map_terms(params, images, d_levels=1, chunk=2)  # Padded chunks too.
  # The rec map's mean is scoring's (independently computed) rec term.
  rec = np.asarray(scores.score_details(params, images)['rec'])
  np.testing.assert_allclose(terms['rec'].mean(axis=(1, 2)), rec, rtol=1e-5)
  # The D term at level 1: D's first convolution (4x4, stride 2, pad 1) by lax, upsampled.
  x = images.astype(np.float32) / 127.5 - 1
  spec = ModelSpec.from_variables(params)
  x_hat = spec.generator().apply(params['generator'], x, train=False)
  kernel = params['discriminator']['params']['conv_0']['kernel']

  def conv(v):
    return jax.lax.conv_general_dilated(
      v, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  small = np.asarray(jnp.mean(jnp.square(conv(x) - conv(x_hat)), axis=-1))
  np.testing.assert_allclose(terms['d'], _bilinear_up2(small, 32), rtol=2e-4, atol=1e-6)
  with pytest.raises(ValueError, match='32x32'):
    localisation.map_terms(params, images[:, :16])


def test_score_maps_returns_the_localisation_map(params, rng):
  """One anomaly map: score_maps' is the unsmoothed 'rec' map of pixel AUROC and PRO."""
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  _, maps = scores.score_maps(params, images)
  np.testing.assert_allclose(localisation.map_terms(params, images)['rec'], maps, rtol=1e-6)
  unsmoothed = localisation.anomaly_maps(params, images, localisation.Settings(sigma=0.0))
  np.testing.assert_allclose(unsmoothed, maps, rtol=1e-6)


def test_rec_plus_d_uses_validation_units(params, rng):
  images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
  terms = localisation.map_terms(params, images, d_levels=2)
  scale = {'rec': 2.0, 'd': 8.0}
  settings = localisation.Settings(map='rec+d', d_weight=0.5, sigma=0.0)
  np.testing.assert_allclose(
    localisation.combine(terms, settings, scale),
    terms['rec'] / 2.0 + 0.5 * terms['d'] / 8.0,
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match='validation scale'):
    localisation.combine(terms, settings, None)


def test_train_reports_pixel_metrics_with_masks(tmp_path):
  """Tiny run on a tiny texture category: report, metrics.json, TensorBoard, overlays."""
  textures.generate_texture(
    str(tmp_path / 'data'), 'gravel', crop=64, num_train=40, num_test_good=4, num_per_kind=2
  )
  config = tiny(load_config('textures'))
  config.dataset.root, config.dataset.category = str(tmp_path / 'data'), 'gravel'
  config.isize, config.batch_size, config.eval_batch_size = 32, 8, 16
  config.num_epochs, config.max_steps_per_epoch, config.log_every_steps = 1, 2, 1
  config.score_kind, config.localisation.sigma = 'map_topk', 1.0
  config.localisation.map = 'rec'  # Recomputed below from G alone.
  workdir = str(tmp_path / 'run')
  report = train.train_and_evaluate(config, workdir)
  # Independent recomputation from the saved model: sklearn on every test pixel.
  from skipganomaly_jax.deploy import trained_run

  params, config, calibration = trained_run.load(workdir)
  splits = input_pipeline.load_splits(config_lib.specs(config).data)
  assert splits.test_masks.shape == (12, 32, 32) and not splits.test_masks[:4].any()
  maps = localisation.anomaly_maps(params, splits.test, localisation.Settings(sigma=1.0))
  assert report['pixel_auroc'] == pytest.approx(
    skm.roc_auc_score(splits.test_masks.ravel(), maps.ravel()), abs=1e-6
  )
  scores = localisation.image_scores(maps, 'map_topk')
  assert report['auroc'] == pytest.approx(skm.roc_auc_score(splits.test_labels, scores), abs=1e-6)
  assert 0 <= report['pro'] <= 1 and set(report['per_defect']) == set(textures.DEFECT_KINDS)
  saved = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  assert saved['score_kind'] == 'map_topk' and saved['final']['pro'] == report['pro']
  assert os.path.getsize(tmp_path / 'run' / overlays.FILENAME) > 10_000
  lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  assert any('eval/pixel_auroc' in json.loads(line) for line in lines)
  assert os.listdir(tmp_path / 'run' / 'tensorboard')
  assert 'pixel AUROC' in localisation.summary(report)


def numpy_pro(maps, masks, regions, max_fpr=0.3) -> float:
  """PRO up to max_fpr, normalised, from regions known by construction.

  regions: (image index, bool (H, W) mask) of each defect region. At every distinct map
  value t as a threshold (>= t): FPR over the defect-free pixels and the mean over the
  regions of the fraction of the region at or above t, counted by binary search in each
  set's sorted values; the trapezoidal area up to max_fpr, cut there by interpolation."""
  thresholds = np.unique(maps)[::-1]
  above = lambda values: 1.0 - np.searchsorted(np.sort(values), thresholds) / values.size
  fpr = above(maps[masks == 0])
  pro = np.mean([above(maps[n][region]) for n, region in regions], axis=0)
  x, y = np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]
  area = 0.0
  for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:], strict=True):
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:
      y1, x1 = y0 + (max_fpr - x0) / (x1 - x0) * (y1 - y0), max_fpr
    area += (x1 - x0) * (y0 + y1) / 2
  return area / max_fpr


@pytest.mark.parametrize('model', ['skipganomaly', 'ganomaly'])
def test_evaluate_with_masks_matches_an_independent_computation(model, rng):
  """`localisation.evaluate` (the training's pixel-metric path) with either model's
  networks, on a tiny masked test set: the maps against G's eval-mode reconstruction
  error smoothed by scipy, the map scores, pixel AUROC, PRO and the per-defect results
  against sklearn and `numpy_pro`."""
  config = tiny(load_config('default'))
  config.nc, config.model.name = 1, model
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  g, d = training_step.create_train_states(spec, jax.random.key(1))
  variables = scores.scoring_variables(g, d)
  assert ModelSpec.from_variables(variables).name == model
  # 3 good test images, 2 'square' and 2 'bar' defects (rectangles of noise over 0..255 on
  # normals of 40..139: pixel AUROC ~0.9, PRO ~0.8 with these networks), 4 val normals.
  normals = rng.integers(40, 140, (11, 32, 32, 1), dtype=np.uint8)
  test, masks = normals[:7].copy(), np.zeros((7, 32, 32), np.uint8)
  boxes = {3: (4, 12, 5, 13), 4: (18, 26, 10, 20), 5: (2, 30, 14, 17), 6: (20, 23, 3, 29)}
  for n, (y0, y1, x0, x1) in boxes.items():
    test[n, y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 1))
    masks[n, y0:y1, x0:x1] = 1
  kinds = np.array(['good'] * 3 + ['square'] * 2 + ['bar'] * 2)
  labels = (kinds != 'good').astype(np.int32)
  splits = splits_lib.DataSplits(
    train=normals[7:],
    val=normals[7:],
    test=test,
    test_labels=labels,
    abnormal_name='defect',
    test_paths=tuple(f'root/test/{k}/{i:03d}.png' for i, k in enumerate(kinds)),
    test_masks=masks,
  )
  settings = localisation.Settings(map='rec', sigma=1.0, topk_fraction=0.01)
  result = localisation.evaluate(variables, splits, 'map_topk', settings)

  def maps_of(images):  # G's eval-mode reconstruction error, smoothed by scipy.
    x = images.astype(np.float32) / 127.5 - 1.0
    out = spec.model.generator().apply(variables['generator'], x, train=False)
    x_hat = np.asarray(out[0] if model == 'ganomaly' else out, np.float64)
    rec = np.mean(np.square(x.astype(np.float64) - x_hat), axis=-1)
    return np.stack([ndimage.gaussian_filter(m, 1.0, mode='reflect', truncate=4.0) for m in rec])

  def topk(maps):  # The mean of the ceil(1% of 1024) = 11 highest pixels.
    return np.sort(maps.reshape(len(maps), -1), axis=1)[:, -11:].mean(axis=1)

  maps = maps_of(test)
  np.testing.assert_allclose(result.test_maps, maps, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(result.test_scores, topk(maps), rtol=1e-4)
  np.testing.assert_allclose(result.val_scores, topk(maps_of(splits.val)), rtol=1e-4)
  report = result.report
  regions = [(n, masks[n] == 1) for n in boxes]
  # From float32 maps: measured off by up to 2.4e-7 (pixel AUROC) and 7.2e-7 (PRO).
  assert report['pixel_auroc'] == pytest.approx(
    skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-4
  )
  assert report['pro'] == pytest.approx(numpy_pro(maps, masks, regions), abs=1e-4)
  for key, scores_ in (('map_topk_auroc', topk(maps)), ('map_max_auroc', maps.max(axis=(1, 2)))):
    assert report[key] == pytest.approx(skm.roc_auc_score(labels, scores_), abs=1e-6)
  assert set(report['per_defect']) == {'square', 'bar'}
  for kind, got in report['per_defect'].items():
    pick = (kinds == 'good') | (kinds == kind)
    assert got['map_auroc'] == pytest.approx(
      skm.roc_auc_score(labels[pick], topk(maps[pick])), abs=1e-6
    )
    assert got['pixel_auroc'] == pytest.approx(
      skm.roc_auc_score(masks[pick].ravel(), maps[pick].ravel()), abs=1e-4
    )
    index = np.cumsum(pick) - 1  # Positions in the picked subset.
    picked = [(int(index[n]), r) for n, r in regions if kinds[n] == kind]
    assert got['pro'] == pytest.approx(numpy_pro(maps[pick], masks[pick], picked), abs=1e-4)
