"""Maps a person can use, and the exported detector's complete preprocessing contract.

- `--mode=score --maps`: per image a grey map PNG on one fixed scale (the run's
  localisation map in units of the normal level, clipped at DISPLAY_MAX), independent
  of the other images scored, with its scale in the PNG's text metadata, and an overlay
  PNG; the same map as reconstructions.png and localisation.png show.
- reconstructions.png and localisation.png: columns cover every defect kind, titled
  with the run's score and the decision against its threshold.
- detector.json's input contract and examples/load_exported.py's `preprocess` (PIL
  only) reproduce `load_images` on a non-square image, and the loader's scores of an
  image file equal score_fn's.

One tiny texture run with masks (widths 8, 1 epoch of 2 steps, module-scoped) and the
session's tiny latent k-NN run (conftest.py's `knn_run`), copied and exported.
"""

import ast
import json
import os
import shutil

import numpy as np
import pytest
from conftest import ROOT, load_config, run_isolated, tiny
from PIL import Image

import skipganomaly_jax
from skipganomaly_jax import config as config_lib
from skipganomaly_jax import score_fn
from skipganomaly_jax.data import images as images_lib
from skipganomaly_jax.data import input_pipeline, mvtec, textures
from skipganomaly_jax.deploy import export, run_modes, trained_run
from skipganomaly_jax.reporting import outputs, overlays, plots
from skipganomaly_jax.scoring import localisation

LOADER = ROOT / 'examples' / 'load_exported.py'
TOP = localisation.DISPLAY_MAX
META_KEYS = {'quantity', 'definition', 'unit', 'display_max', 'map_max', 'source', 'score'}


def loader():
  import runpy  # noqa: PLC0415

  return runpy.run_path(str(LOADER))


# ----------------------------------------------------------------------------- unit checks


def test_pick_covers_every_kind():
  labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
  kinds = np.array(['good'] * 5 + ['scratch'] * 4 + ['blob'] * 3 + ['patch', 'shift'])
  idx = plots.pick_examples(labels, 2, kinds)
  assert list(idx[:2]) == [0, 1]
  # At least one column per kind (4 kinds > 2 per class), round-robin in name order.
  assert list(kinds[idx[2:]]) == ['blob', 'patch', 'scratch', 'shift']
  idx = plots.pick_examples(labels, 6, kinds)
  assert list(kinds[idx[5:]]) == ['blob', 'patch', 'scratch', 'shift', 'blob', 'scratch']
  # Without kinds: the first ones, as before.
  np.testing.assert_array_equal(plots.pick_examples(labels, 2), [0, 1, 5, 6])


def test_column_titles_say_score_and_decision():
  assert plots.column_title('scratch', 0.5, 0.25) == 'scratch\nscore 0.5\n-> anomalous'
  assert plots.column_title('good', 0.25, 0.25) == 'good\nscore 0.25\n-> normal'
  assert plots.column_title('good', 0.1, None) == 'good\nscore 0.1'


def test_map_pngs_have_one_fixed_scale(tmp_path):
  """Grey level = 255 * min(map, TOP) / TOP, whatever else is in the batch."""
  values = np.array([0.0, 1.0, TOP / 2, TOP, 3 * TOP])
  maps = np.broadcast_to(values[:, None, None], (5, 8, 8)).astype(np.float32)
  images = np.zeros((5, 8, 8, 1), np.uint8)
  scale = localisation.MapScale(unit=0.01, terms={'rec': 0.002}, num_val=7)
  paths = [f'/data/img{i}.png' for i in range(5)]
  written = outputs.write_anomaly_maps(
    str(tmp_path), paths, images, maps, localisation.Settings(), scale, np.arange(5.0)
  )
  assert [os.path.basename(p) for p in written[:2]] == [
    '00000_img0_map.png',
    '00000_img0_overlay.png',
  ]
  greys = [np.asarray(Image.open(p))[0, 0] for p in written[::2]]
  assert greys == [0, round(255 / TOP), 128, 255, 255]
  with Image.open(written[2]) as im:
    text = im.text
  assert META_KEYS <= set(text) and 'encoding' in text
  assert float(text['unit']) == 0.01 and float(text['display_max']) == TOP
  assert float(text['map_max']) == 1.0 and text['source'] == paths[1]
  assert '99.9th percentile' in text['definition'] and '7 validation normals' in text['definition']
  # The same image alone: the same PNG.
  alone = outputs.write_anomaly_maps(
    str(tmp_path / 'alone'), paths[3:4], images[3:4], maps[3:4], localisation.Settings(), scale
  )
  np.testing.assert_array_equal(
    np.asarray(Image.open(alone[0])), np.asarray(Image.open(written[6]))
  )


def test_overlay_blends_by_map_value():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
  clean = np.asarray(overlays.overlay_image(image, np.zeros((16, 16))))
  assert clean.shape == (overlays.OVERLAY_SIDE + 48, overlays.OVERLAY_SIDE, 3)
  body = clean[: overlays.OVERLAY_SIDE]
  # A zero map leaves the (upscaled) image as it is: grey, R = G = B.
  assert (body[..., 0] == body[..., 1]).all() and (body[..., 1] == body[..., 2]).all()
  hot = np.asarray(overlays.overlay_image(np.zeros_like(image), np.full((16, 16), 2 * TOP)))
  # At or above the top: 60% of the colormap's top colour (jet: dark red) over black.
  np.testing.assert_allclose(hot[5, 5], 0.6 * 255 * np.array([0.5, 0, 0]), atol=2)
  assert hot[overlays.OVERLAY_SIDE :].std() > 0  # The legend.


# ----------------------------------------------------------------------------- a texture run


@pytest.fixture(scope='module')
def texture_run(tmp_path_factory):
  """A tiny map_topk run on a tiny texture category with masks (4 defect kinds)."""
  tmp = tmp_path_factory.mktemp('maps')
  textures.generate_texture(
    str(tmp / 'data'), 'gravel', crop=64, num_train=40, num_test_good=4, num_per_kind=2
  )
  config = tiny(load_config('textures'))
  config.dataset.root, config.dataset.category = str(tmp / 'data'), 'gravel'
  config.isize, config.batch_size, config.eval_batch_size = 32, 8, 16
  config.num_epochs, config.max_steps_per_epoch, config.log_every_steps = 1, 2, 1
  config.localisation.sigma = 1.0  # 'rec+d', map_topk: the textures config's.
  from skipganomaly_jax.training import train  # noqa: PLC0415

  train.train_and_evaluate(config, str(tmp / 'run'))
  model = trained_run.restore(str(tmp / 'run'))
  splits = input_pipeline.load_splits(model.specs.data)
  return tmp / 'run', model, splits


def _captured(monkeypatch, module, name):
  calls = []
  monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(args))
  return calls


def test_pictures_show_one_map_scores_and_decisions(texture_run, monkeypatch):
  """reconstructions.png and localisation.png: every kind, the run's scores and decisions,
  and the same maps (fixed scale) as --maps writes for those image files."""
  workdir, model, splits = texture_run
  settings, calibration = model.specs.localisation, model.calibration
  assert (workdir / 'reconstructions.png').is_file() and (workdir / overlays.FILENAME).is_file()
  scale = trained_run.map_scale(model)
  scores = localisation.evaluate(model.params, splits, 'map_topk', settings).test_scores
  grid = _captured(monkeypatch, plots, '_draw_grid')
  outputs.write_reconstructions(
    'unused.png', splits, model.params, scores, calibration, settings, scale
  )
  drawn = _captured(monkeypatch, overlays, 'save_overlays')
  overlays.write_overlays('unused', settings, model.params, splits, scores, calibration, scale)
  (_, _, _, grid_maps, _, titles, vmax, label, _), (_, _, ov_maps, _, ov_titles, ov_vmax) = (
    grid[0],
    drawn[0],
  )
  assert vmax == ov_vmax == TOP and localisation.UNIT_NAME in label
  kinds = mvtec.defect_kinds(splits)
  idx = plots.pick_examples(splits.test_labels, 4, kinds)
  assert set(kinds[idx]) == {'good', *textures.DEFECT_KINDS}
  for got in (titles, ov_titles):
    want = [
      plots.column_title(k, s, calibration.threshold)
      for k, s in zip(kinds[idx], scores[idx], strict=True)
    ]
    assert got == want
  np.testing.assert_allclose(grid_maps, ov_maps, rtol=1e-6)
  # --maps of the same image files: the same maps, quantised to 255 grey levels.
  folder = workdir.parent / 'picked'
  folder.mkdir()
  for j, i in enumerate(idx):  # Named in column order.
    shutil.copy(splits.test_paths[i], folder / f'{j:03d}_{kinds[i]}.png')
  run_modes.score_path(str(workdir), str(folder), write_maps=True)
  pngs = sorted((workdir / 'anomaly_maps').glob('*_map.png'))
  assert len(pngs) == len(idx) == len(list((workdir / 'anomaly_maps').glob('*_overlay.png')))
  greys = np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(np.float64)
  np.testing.assert_allclose(greys / 255 * TOP, np.clip(grid_maps, 0, TOP), atol=TOP / 255)


def test_score_maps_metadata_unit_and_batch_independence(texture_run, tmp_path):
  workdir, model, splits = texture_run
  settings = model.specs.localisation
  # The unit: the 99.9th percentile of the run's map over the validation normals' pixels.
  terms = localisation.term_scale(localisation.map_terms(model.params, splits.val, 2))
  val_maps = localisation.anomaly_maps(model.params, splits.val, settings, terms)
  scale = trained_run.map_scale(model)
  assert scale.unit == pytest.approx(np.percentile(val_maps, 99.9), rel=1e-6)
  assert np.mean(val_maps / scale.unit <= 1.0) == pytest.approx(0.999, abs=1e-3)
  bad = [p for p, label in zip(splits.test_paths, splits.test_labels, strict=True) if label][:3]
  out = {}
  for name, picked in (('many', [0, 1, 2]), ('one', [1])):
    folder = tmp_path / name
    folder.mkdir()
    for j in picked:  # Unique names: defect folders reuse file names.
      shutil.copy(bad[j], folder / f'{j}_{os.path.basename(bad[j])}')
    shutil.rmtree(workdir / 'anomaly_maps', ignore_errors=True)
    run_modes.score_path(str(workdir), str(folder), write_maps=True)
    out[name] = {}
    for path in sorted((workdir / 'anomaly_maps').iterdir()):
      with Image.open(path) as im:
        out[name][path.name] = (np.asarray(im), dict(im.text))
  maps = {k: [v for n, v in out[k].items() if n.endswith('_map.png')] for k in out}
  assert len(maps['many']) == 3 and len(maps['one']) == 1
  alone, among = maps['one'][0], maps['many'][1]
  np.testing.assert_array_equal(alone[0], among[0])  # Not scaled by the other images.
  text = alone[1]
  assert META_KEYS | {'threshold', 'anomalous', 'encoding'} <= set(text)
  assert float(text['unit']) == pytest.approx(scale.unit, rel=1e-5)
  assert text['anomalous'] == (
    'yes' if float(text['score']) > model.calibration.threshold else 'no'
  )
  assert 'D-feature' in text['definition']  # The run's 'rec+d' map, described.
  overlay = [v for n, v in out['one'].items() if n.endswith('_overlay.png')][0]
  assert overlay[0].shape == (overlays.OVERLAY_SIDE + 48, overlays.OVERLAY_SIDE, 3)
  assert overlay[1]['unit'] == text['unit']


# ----------------------------------------------------------------------------- the contract


def _odd_images(folder):
  """Non-square images of every kind the contract names; {name: path}."""
  rng = np.random.default_rng(5)
  rgb = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)  # 50 wide, 37 high.
  made = {
    'rgb_50x37': Image.fromarray(rgb),
    'rgb_37x50': Image.fromarray(rgb.transpose(1, 0, 2).copy()),
    'rgba': Image.fromarray(rng.integers(0, 256, (45, 33, 4), dtype=np.uint8)),
    'grey': Image.fromarray(rng.integers(0, 256, (40, 61), dtype=np.uint8)),
    'palette': Image.fromarray(rgb).convert('P'),
    'grey16': Image.fromarray(rng.integers(0, 65536, (35, 35), dtype=np.uint16)),
    'square': Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
    'odd_crop': Image.fromarray(rng.integers(0, 256, (32, 35, 3), dtype=np.uint8)),
  }
  paths = {}
  for name, image in made.items():
    paths[name] = folder / f'{name}.png'
    image.save(paths[name])
  return paths


@pytest.mark.parametrize('nc', [1, 3])
def test_loader_preprocess_equals_load_images(tmp_path, nc):
  preprocess = loader()['preprocess']
  meta = {'input': {'shape': [None, 32, 32, nc]}}
  for name, path in _odd_images(tmp_path).items():
    want = images_lib.load_images(str(path), 32, nc)[0][0]
    got = preprocess(str(path), meta)
    assert got.dtype == np.uint8 and got.shape == (32, 32, nc), name
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_loader_imports_only_pil_jax_numpy():
  tree = ast.parse(LOADER.read_text())
  modules = {
    (a.name if isinstance(node, ast.Import) else node.module).split('.')[0]
    for node in ast.walk(tree)
    if isinstance(node, ast.Import | ast.ImportFrom)
    for a in node.names
  }
  assert modules <= {'hashlib', 'json', 'pathlib', 'sys', 'jax', 'numpy', 'PIL'}, modules


@pytest.fixture(scope='module')
def exported(knn_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('contract') / 'run'
  shutil.copytree(knn_run.workdir, workdir)
  return workdir, export.export_run(str(workdir))


def test_detector_json_states_the_whole_contract(exported):
  _, directory = exported
  spec = json.loads(open(os.path.join(directory, 'detector.json')).read())['input']
  assert spec['dtype'] == 'uint8' and spec['value_range'] == [0, 255]
  assert spec['resize']['method'] == 'bilinear' and 'BILINEAR' in spec['resize']['call']
  assert 'after the resize' in spec['crop']['kind'] and 'round' in spec['crop']['box']
  assert 'shorter side to 32' in spec['resize']['size']
  assert (
    '299/1000' in spec['channels']['rgb_to_grey']
    and 'R, G and B' in spec['channels']['grey_to_rgb']
  )
  assert 'dropped' in spec['channels']['alpha'] and '127.5' in spec['scaling']
  assert spec == {**spec, **images_lib.preprocessing_contract(32, 1)}


def test_loader_scores_an_image_file_as_the_project_does(exported, tmp_path):
  """Standalone (package blocked): preprocess a 50x37 RGB PNG and score it."""
  workdir, directory = exported
  paths = _odd_images(tmp_path)
  files = [str(paths[n]) for n in ('rgb_50x37', 'rgb_37x50', 'rgba', 'grey')]
  code = f"""
import json, runpy, sys
sys.modules['skipganomaly_jax'] = None
loader = runpy.run_path({str(LOADER)!r})
detect, meta = loader['load_detector']({directory!r})
import numpy as np
x = np.stack([loader['preprocess'](p, meta) for p in {files!r}])
np.save('x.npy', x)
scores, anomalous = detect(x)
print(json.dumps({{'scores': scores.tolist(), 'anomalous': anomalous.tolist()}}))
"""
  out = run_isolated(code, tmp_path)
  ours = np.concatenate([input_pipeline.load_images(f, 32, 1)[0] for f in files])
  np.testing.assert_array_equal(np.load(tmp_path / 'x.npy'), ours)
  params, config, calibration = skipganomaly_jax.load(str(workdir))
  expected = np.asarray(score_fn(params, ours, lam=config.score_lambda))
  np.testing.assert_allclose(out['scores'], expected, rtol=1e-5)
  assert out['anomalous'] == calibration.is_anomalous(expected).tolist()
  assert config_lib.specs(config).model.nc == 1
