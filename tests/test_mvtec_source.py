"""The MVTec AD source, masks through the geometry, folder masks and the texture generator."""

import os

import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import images as images_lib
from skipganomaly_jax.data import input_pipeline as ip
from skipganomaly_jax.data import mvtec, textures


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _nearest_resize_crop(mask: np.ndarray, isize: int) -> tuple[np.ndarray, np.ndarray]:
  """Plain numpy: shorter side to isize by nearest neighbour (pixel centres), centre crop.

  Returns two masks that differ only where an output pixel's centre falls exactly on a
  boundary between two source pixels (a tie: either neighbour is nearest, and which one
  a float implementation picks depends on its rounding): (lower neighbour, upper).
  """
  h, w = mask.shape
  nh, nw = (
    (max(isize, int(isize * h / w)), isize) if w <= h else (isize, max(isize, int(isize * w / h)))
  )

  def sources(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    # Exact integers: the centre of output pixel i is (2i + 1) * n_in / (2 n_out).
    num, den = (2 * np.arange(n_out) + 1) * n_in, 2 * n_out
    upper = np.minimum(num // den, n_in - 1)
    lower = np.where(num % den == 0, np.maximum(upper - 1, 0), upper)
    return lower, upper

  top, left = int(round((nh - isize) / 2)), int(round((nw - isize) / 2))
  (r_lo, r_hi), (c_lo, c_hi) = sources(nh, h), sources(nw, w)
  crop = (slice(top, top + isize), slice(left, left + isize))
  return mask[r_lo][:, c_lo][crop], mask[r_hi][:, c_hi][crop]


def make_category(root, rng, size=(50, 37), defects=('crack', 'hole'), n=3):
  """A random MVTec-layout category of (w, h) = size RGB images with rectangle masks."""
  w, h = size
  masks = {}
  for split, kind in [('train', 'good'), ('test', 'good')] + [('test', d) for d in defects]:
    for i in range(n if split == 'test' else 12):
      image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
      _save(os.path.join(root, split, kind, f'{i:03d}.png'), image)
      if kind != 'good':
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
        mask[y : y + rng.integers(2, 12), x : x + rng.integers(2, 12)] = 255
        _save(os.path.join(root, 'ground_truth', kind, f'{i:03d}_mask.png'), mask)
        masks[os.path.join(root, split, kind, f'{i:03d}.png')] = mask
  return masks


def mvtec_config(root, category='', isize=32):
  config = load_config('default')
  config.dataset.name, config.dataset.root, config.dataset.category = 'mvtec', root, category
  config.isize, config.nc, config.batch_size = isize, 3, 4
  return config


def load_splits(config):
  """`input_pipeline.load_splits` of a config's checked data spec (as a run loads it)."""
  return ip.load_splits(config_lib.specs(config).data)


@pytest.mark.parametrize('size', [(50, 37), (37, 50), (32, 32), (100, 64)])
def test_mvtec_layout_and_mask_geometry(tmp_path, rng, size):
  masks = make_category(str(tmp_path / 'cat'), rng, size)
  s = load_splits(mvtec_config(str(tmp_path), 'cat'))
  assert s.test.shape == (9, 32, 32, 3) and s.test_masks.shape == (9, 32, 32)
  assert (len(s.train), len(s.val)) == (11, 1)
  np.testing.assert_array_equal(s.test_labels, [0, 0, 0, 1, 1, 1, 1, 1, 1])
  kinds = mvtec.defect_kinds(s)
  assert list(kinds) == ['good'] * 3 + ['crack'] * 3 + ['hole'] * 3
  assert s.abnormal_name == 'crack,hole' and s.test_masks.dtype == np.uint8
  assert not s.test_masks[:3].any()
  for path, mask, got in zip(s.test_paths[3:], s.test_masks[3:], s.test[3:], strict=True):
    lower, upper = _nearest_resize_crop(masks[path] > 127, 32)
    assert np.all((mask == lower) | (mask == upper)), path
    np.testing.assert_array_equal(got, images_lib.read_image(path, 32, 3))


def test_mask_follows_its_image(tmp_path):
  # An image that is its own mask (white square on black): after the image's bilinear
  # geometry and the mask's nearest one they agree except on the square's border.
  image = np.zeros((90, 60), np.uint8)
  image[30:60, 20:45] = 255
  _save(str(tmp_path / 'm.png'), image)
  mask = mvtec.read_mask(str(tmp_path / 'm.png'), (60, 90), 32)
  resized = images_lib.read_image(str(tmp_path / 'm.png'), 32, 1)[..., 0] > 127
  assert np.mean(mask == resized) > 0.97 and mask.sum() > 50


def test_missing_or_bad_masks_are_named(tmp_path, rng):
  root = str(tmp_path / 'cat')
  make_category(root, rng)
  os.remove(os.path.join(root, 'ground_truth', 'hole', '001_mask.png'))
  with pytest.raises(FileNotFoundError, match=r'test/hole/001\.png has no mask'):
    load_splits(mvtec_config(root))
  _save(os.path.join(root, 'ground_truth', 'hole', '001_mask.png'), np.zeros((5, 5), np.uint8))
  with pytest.raises(ValueError, match=r'001_mask\.png is 5x5 but its image is 50x37'):
    load_splits(mvtec_config(root))
  with pytest.raises(FileNotFoundError, match='category'):
    load_splits(mvtec_config(str(tmp_path), 'no_such_category'))


def test_folder_layout_masks_are_optional(tmp_path, rng):
  root = str(tmp_path)
  for split, cls, n in (
    ('train', '0.normal', 8),
    ('test', '0.normal', 2),
    ('test', '1.abnormal', 2),
  ):
    for i in range(n):
      _save(f'{root}/{split}/{cls}/{i}.png', rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
  config = load_config('folder')
  config.dataset.root, config.isize, config.batch_size = root, 32, 4
  assert load_splits(config).test_masks is None
  mask = np.zeros((40, 40), np.uint8)
  mask[5:20, 5:9] = 255
  _save(f'{root}/ground_truth/1.abnormal/0_mask.png', mask)
  with pytest.raises(FileNotFoundError, match=r'1\.abnormal/1\.png has no mask'):
    load_splits(config)
  _save(f'{root}/ground_truth/1.abnormal/1_mask.png', mask)
  s = load_splits(config)
  np.testing.assert_array_equal(s.test_labels, [0, 0, 1, 1])
  lower, upper = _nearest_resize_crop(mask > 0, 32)
  assert np.all((s.test_masks[2] == lower) | (s.test_masks[2] == upper))
  assert not s.test_masks[:2].any()


@pytest.mark.parametrize('kind', textures.DEFECT_KINDS)
def test_defects_change_exactly_their_mask(rng, kind):
  crop = textures.random_crop(rng, textures.photo('grass'), 96, (0, 512)).astype(np.float64)
  out, mask = textures.DEFECTS[kind](rng, crop, textures.TEXTURES, 'grass')
  assert mask.any() and mask.mean() < 0.2
  np.testing.assert_array_equal(out[~mask], crop[~mask])
  assert np.mean(out[mask] != crop[mask]) > 0.5


def test_generator_is_seeded_and_readable(tmp_path):
  kw = {'crop': 32, 'num_train': 6, 'num_test_good': 2, 'num_per_kind': 1}
  for out, seed in (('a', 0), ('b', 0), ('c', 1)):
    textures.generate_texture(str(tmp_path / out), 'brick', seed=seed, **kw)
  a, b, c = (load_splits(mvtec_config(str(tmp_path / o), 'brick')) for o in 'abc')
  np.testing.assert_array_equal(a.test, b.test)
  np.testing.assert_array_equal(a.test_masks, b.test_masks)
  assert not np.array_equal(a.test, c.test)
  assert list(mvtec.defect_kinds(a)) == ['good'] * 2 + sorted(textures.DEFECT_KINDS)
  assert a.test_masks[2:].reshape(4, -1).any(axis=1).all()
