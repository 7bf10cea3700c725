"""The 'arrays' dataset source: an .npz of images and labels through both protocols, bad
files, and a tiny end-to-end training run. Every array is made here (seeded); the training
run is the session's `knn_run` (conftest.py), whose digits come from an .npz."""

import json

import numpy as np
import pytest
from conftest import DIGITS_TEST_ABNORMAL, DIGITS_TEST_NORMAL, load_config
from PIL import Image

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline as ip

NAMES = np.array(['cat', 'dog', 'ship'])


def make_arrays(n_per_class=(30, 20, 10), size=32, channels=3, seed=0, is_test=False):
  """Random images whose first two pixels encode their row index (to identify them)."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(n_per_class)), n_per_class))
  n = len(labels)
  images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
  arrays = {'images': images, 'labels': labels, 'class_names': NAMES[: len(n_per_class)]}
  if is_test:
    arrays['is_test'] = rng.random(n) < 0.3
  return arrays


def ids(images):
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)


def save(tmp_path, name='data.npz', **arrays):
  path = tmp_path / name
  np.savez(path, **arrays)
  return str(path)


def config_for(path, batch_size=8, isize=32, nc=3, **dataset):
  config = load_config('cifar10_arrays')
  config.dataset.path = path
  config.batch_size, config.isize, config.nc = batch_size, isize, nc
  config.dataset.update(dataset)
  return config


def load_splits(config):
  """`input_pipeline.load_splits` of a config's checked data spec (as a run loads it)."""
  return ip.load_splits(config_lib.specs(config).data)


def test_ganomaly_protocol_pools_normals_80_20(tmp_path):
  arrays = make_arrays()
  path = save(tmp_path, **arrays)
  s = load_splits(config_for(path, abnormal_class='dog', seed=3, val_fraction=0.1))
  labels = arrays['labels']
  normal, abnormal = np.flatnonzero(labels != 1), np.flatnonzero(labels == 1)
  train, val = ids(s.train), ids(s.val)
  test_normal, test_abnormal = ids(s.test[s.test_labels == 0]), ids(s.test[s.test_labels == 1])
  # 40 normals: 32 train (3 of them validation), 8 normal test; all 20 dogs abnormal.
  assert (len(train), len(val), len(test_normal)) == (29, 3, 8)
  assert sorted(np.concatenate([train, val, test_normal])) == sorted(normal)
  np.testing.assert_array_equal(test_abnormal, abnormal)  # File order.
  np.testing.assert_array_equal(s.test_labels, np.repeat([0, 1], [8, 20]))
  assert s.abnormal_name == 'dog' and s.train.dtype == np.uint8
  np.testing.assert_array_equal(s.train, arrays['images'][train])  # Pixels untouched.
  again = load_splits(config_for(path, abnormal_class='1', seed=3, val_fraction=0.1))
  np.testing.assert_array_equal(again.test, s.test)  # Index '1' = name 'dog'; seeded.
  other = load_splits(config_for(path, abnormal_class='dog', seed=4, val_fraction=0.1))
  assert set(ids(other.test[:8])) != set(test_normal)


def test_one_class_protocol_uses_the_files_split(tmp_path):
  arrays = make_arrays(is_test=True)
  path = save(tmp_path, **arrays)
  s = load_splits(config_for(path, abnormal_class='cat', protocol='one_class'))
  labels, is_test = arrays['labels'], arrays['is_test']
  normal = labels != 0
  train_ids = np.concatenate([ids(s.train), ids(s.val)])
  assert sorted(train_ids) == list(np.flatnonzero(normal & ~is_test))
  want_test = np.concatenate(
    [
      np.flatnonzero(normal & is_test),
      np.flatnonzero(~normal & ~is_test),
      np.flatnonzero(~normal & is_test),
    ]
  )
  np.testing.assert_array_equal(ids(s.test), want_test)
  assert s.test_labels.sum() == 30


def test_one_class_without_is_test_is_an_error(tmp_path):
  path = save(tmp_path, **make_arrays())
  with pytest.raises(ValueError, match=r'(?s)no.*is_test.*protocol=ganomaly'):
    load_splits(config_for(path, protocol='one_class', abnormal_class='cat'))


def test_resize_and_grayscale_match_pil(tmp_path):
  arrays = make_arrays(size=64)
  path = save(tmp_path, **arrays)
  s = load_splits(config_for(path, abnormal_class='ship', nc=1))
  # Resizing loses the ids: the same split loaded at 64x64 RGB gives the rows, in order.
  plain = load_splits(config_for(path, abnormal_class='ship', isize=64))
  rows = ids(plain.train)
  want = np.stack(
    [
      np.asarray(Image.fromarray(arrays['images'][r]).convert('L').resize((32, 32), Image.BILINEAR))
      for r in rows
    ]
  )
  assert s.train.shape == (len(rows), 32, 32, 1)
  np.testing.assert_array_equal(s.train[..., 0], want)


def test_class_names_default_to_indices(tmp_path):
  arrays = make_arrays()
  del arrays['class_names']
  s = load_splits(config_for(save(tmp_path, **arrays), abnormal_class='2'))
  assert s.abnormal_name == '2' and s.test_labels.sum() == 10


@pytest.mark.parametrize(
  'change, match',
  [
    (lambda a: a.pop('labels'), r"missing key\(s\) \['labels'\]"),
    (lambda a: a.update(images=a['images'].astype(np.float32)), 'images must be uint8'),
    (lambda a: a.update(images=a['images'][..., 0]), r'shape \(N, H, W, C\)'),
    (lambda a: a.update(labels=a['labels'][:-1]), '60 images but 59 labels'),
    (lambda a: a.update(labels=a['labels'].astype(float)), 'labels must be a 1-D int'),
    (lambda a: a.update(is_test=np.zeros(60, np.int64)), 'is_test must be bool'),
    (lambda a: a.update(class_names=NAMES[:2]), 'label 2 has no name'),
    (lambda a: a.update(class_names=np.array([1, 2, 3], object)), 'without pickle'),
  ],
)
def test_bad_files_are_named(tmp_path, change, match):
  arrays = make_arrays()
  change(arrays)
  np.savez(tmp_path / 'bad.npz', **arrays)
  with pytest.raises(ValueError, match=match) as info:
    load_splits(config_for(str(tmp_path / 'bad.npz'), abnormal_class='cat'))
  assert 'bad.npz' in str(info.value)


def test_bad_paths_and_classes(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nothing\.npz.*dataset\.path'):
    load_splits(config_for(str(tmp_path / 'nothing.npz')))
  with pytest.raises(FileNotFoundError, match='dataset.path'):
    load_splits(config_for(''))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(ValueError, match=r'junk\.npz.*not an \.npz'):
    load_splits(config_for(str(tmp_path / 'junk.npz'), abnormal_class='cat'))
  path = save(tmp_path, **make_arrays())
  with pytest.raises(ValueError, match=r"no class 'horse'.*0='cat'"):
    load_splits(config_for(path, abnormal_class='horse'))
  absent = make_arrays()
  absent['class_names'] = np.array(['cat', 'dog', 'ship', 'frog'])
  with pytest.raises(ValueError, match=r"no image of the abnormal class 'frog'"):
    load_splits(config_for(save(tmp_path, 'absent.npz', **absent), abnormal_class='frog'))
  only = make_arrays(n_per_class=(12,))
  with pytest.raises(ValueError, match='No normal training images'):
    load_splits(config_for(save(tmp_path, 'one.npz', **only), abnormal_class='cat'))
  split = make_arrays(is_test=True)
  split['is_test'][:] = True
  with pytest.raises(ValueError, match='No normal training images'):
    load_splits(
      config_for(save(tmp_path, 's.npz', **split), abnormal_class='cat', protocol='one_class')
    )


def test_tiny_training_run_on_arrays(knn_run):
  # 1 epoch of 2 steps on 50 digits of each class, class_names 'zero'..'nine', digit 0
  # abnormal: 450 normals -> 360 train (18 validation) + 90 normal test; 50 zeros abnormal.
  report = knn_run.report
  assert knn_run.config.dataset.name == 'arrays'
  expected = (DIGITS_TEST_NORMAL, DIGITS_TEST_ABNORMAL, 2)
  assert (report['num_normal'], report['num_abnormal'], report['step']) == expected
  assert 0.0 <= report['auroc'] <= 1.0
  saved = json.loads((knn_run.workdir / 'metrics.json').read_text())
  assert saved['abnormal_class'] == 'zero'  # Index '0', named by the file's class_names.
