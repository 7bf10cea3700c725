"""Tests that skipganomaly_jax.reporting.plots writes valid PNG images of plausible size."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from skipganomaly_jax.reporting import plots


def _read_png(path):
  """Opens a PNG, checks it is valid, and returns it as an RGB(A) array."""
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == 'PNG'
    return np.asarray(im.convert('RGB'))


def _data(rng, n=40):
  labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
  scores = rng.normal(size=n) + labels
  return labels, scores


def test_roc_and_histogram(tmp_path):
  rng = np.random.default_rng(0)
  labels, scores = _data(rng)
  roc = tmp_path / 'sub' / 'roc.png'
  hist = tmp_path / 'hist.png'
  plots.save_roc_curve(roc, labels, scores, 'ROC test')
  plots.save_score_histogram(str(hist), labels, scores, 0.5, 'scores')
  plots.save_score_histogram(tmp_path / 'hist_equal.png', labels, np.ones(40), None, 'flat')
  for path, min_w in ((roc, 300), (hist, 400), (tmp_path / 'hist_equal.png', 400)):
    arr = _read_png(path)
    assert arr.shape[1] >= min_w and arr.shape[0] >= 300
    assert arr.std() > 0  # Not a blank image.


@pytest.mark.parametrize('channels', [1, 3])
def test_reconstruction_grid(tmp_path, channels):
  rng = np.random.default_rng(1)
  n = 12
  labels = np.array([0, 1] * (n // 2))
  images = rng.uniform(-1, 1, size=(n, 32, 32, channels)).astype(np.float32)
  recons = np.clip(images + rng.normal(scale=0.2, size=images.shape), -1.5, 1.5)
  maps = np.abs(images - recons).mean(-1)
  path = tmp_path / f'grid{channels}.png'
  plots.save_reconstruction_grid(path, images, recons, maps, labels, rng.normal(size=n))
  arr = _read_png(path)
  # 8 columns (4 normal + 4 abnormal), 3 rows.
  assert arr.shape[1] >= 8 * 100 and arr.shape[0] >= 400
  assert arr.std() > 0


def test_reconstruction_grid_one_class_and_maps_with_channel(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, size=(3, 16, 16, 3))
  maps = rng.uniform(size=(3, 16, 16, 1))
  path = tmp_path / 'grid.png'
  plots.save_reconstruction_grid(path, images, images, maps, np.zeros(3), np.zeros(3))
  assert _read_png(path).shape[0] >= 300
  with pytest.raises(ValueError, match='channels'):
    plots.save_reconstruction_grid(path, images[..., :2], images[..., :2], maps, [0] * 3, [0] * 3)


def test_pyplot_not_imported(tmp_path):
  """Plotting uses an explicit Agg canvas: no pyplot, no global backend switch."""
  code = (
    'import sys, numpy as np\n'
    'from skipganomaly_jax.reporting import plots\n'
    f'plots.save_roc_curve({str(tmp_path / "r.png")!r}, [0, 1, 0, 1], np.arange(4.0), "t")\n'
    'assert "matplotlib.pyplot" not in sys.modules\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=60)
  assert (tmp_path / 'r.png').exists()


def test_pick_examples_first_of_each_class():
  labels = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(plots.pick_examples(labels, 2), [1, 4, 0, 2])
  np.testing.assert_array_equal(plots.pick_examples(labels), [1, 4, 5, 7, 0, 2, 3, 6])
  np.testing.assert_array_equal(plots.pick_examples([0, 0], 4), [0, 1])


def test_reconstruction_grid_title_names_the_score_and_the_rule(tmp_path, monkeypatch):
  drawn = {}
  monkeypatch.setattr(plots, '_draw_grid', lambda *args: drawn.setdefault('title', args[-1]))
  x = np.zeros((4, 32, 32, 1), np.float32)
  args = (x, x, np.zeros((4, 32, 32)), np.array([0, 0, 1, 1]), np.arange(4.0), 2)
  plots.save_reconstruction_grid(tmp_path / 'r.png', *args, threshold=0.25, score_name='map_topk')
  assert drawn['title'] == "scores: map_topk (the run's score); anomalous = score > 0.25"
