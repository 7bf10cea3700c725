"""Tests of the input pipeline: sources, protocols, bad input and batching (offline, fast)."""

import ast
import hashlib
import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline as ip
from skipganomaly_jax.data import prepare_data, sources, splits

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_config(**dataset):
  """configs/default.py with dataset fields (and isize/nc/batch_size) overridden."""
  spec = importlib.util.spec_from_file_location('default_config', _ROOT / 'configs' / 'default.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key in ('isize', 'nc', 'batch_size'):
    if key in dataset:
      setattr(config, key, dataset.pop(key))
  config.dataset.update(dataset)
  return config


def load_splits(config):
  """`input_pipeline.load_splits` of a config's checked data spec (as a run loads it)."""
  return ip.load_splits(config_lib.specs(config).data)


def digest(image: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- offline digits


@pytest.fixture(scope='module')
def digit_splits():
  return {
    p: load_splits(make_config(name='mnist_offline', abnormal_class='0', protocol=p, nc=1))
    for p in ip.PROTOCOLS
  }


@pytest.mark.parametrize('protocol', ['ganomaly', 'one_class'])
def test_digit_protocol_sizes(digit_splits, protocol):
  # 500 per digit; 4,500 normals -> 3,600 train + val (val 5% = 180), 900 normal test,
  # all 500 zeros abnormal. 'one_class' uses a seeded 80/20 split per digit.
  s = digit_splits[protocol]
  assert (len(s.train), len(s.val)) == (3420, 180)
  assert s.test.shape == (1400, 32, 32, 1) and s.train.dtype == np.uint8
  assert s.test_labels.dtype == np.int32
  np.testing.assert_array_equal(s.test_labels, np.repeat([0, 1], [900, 500]))
  assert s.abnormal_name == '0'


@pytest.mark.parametrize('protocol', ['ganomaly', 'one_class'])
def test_digit_parts_disjoint(digit_splits, protocol):
  _, labels = sources._mnist_5k()
  pool = sources.mnist_offline_pool(32, 1, seed=0)
  idx = splits.protocol_indices(labels, pool.is_test, 0, protocol, 0, 0.05)
  every = np.concatenate(list(idx.values()))
  np.testing.assert_array_equal(np.sort(every), np.arange(5000))  # Each image in one part.
  assert set(labels[idx['test_abnormal']]) == {0} and 0 not in labels[idx['train']]
  # The same by content: the 5,000 resized digits are all distinct.
  hashes = [digest(x) for x in pool.images]
  assert len(set(hashes)) == 5000
  s = digit_splits[protocol]
  train = {digest(x) for x in s.train}
  assert not train & {digest(x) for x in s.val}
  assert not train & {digest(x) for x in s.test}
  np.testing.assert_array_equal(s.train, pool.images[idx['train']])


def test_digit_split_seeded():
  _, labels = sources._mnist_5k()
  is_test = sources.stratified_test_split(labels, 0.2, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[~is_test]), [400] * 10)
  a = splits.protocol_indices(labels, is_test, 3, 'ganomaly', 0, 0.05)
  b = splits.protocol_indices(labels, is_test, 3, 'ganomaly', 0, 0.05)
  c = splits.protocol_indices(labels, is_test, 3, 'ganomaly', 1, 0.05)
  np.testing.assert_array_equal(a['train'], b['train'])
  assert not np.array_equal(np.sort(a['val']), np.sort(c['val']))
  tiny = splits.protocol_indices(labels, is_test, 3, 'one_class', 0, 1e-6)
  assert len(tiny['val']) == 1  # At least one validation image when val_fraction > 0.
  assert len(splits.protocol_indices(labels, is_test, 3, 'one_class', 0, 0.0)['val']) == 0


def test_digit_class_by_name_and_index_and_rgb():
  by_str = load_splits(make_config(name='mnist_offline', abnormal_class='7', nc=3))
  by_int = splits.resolve_class(7, sources.DIGITS, 'mnist_offline')
  assert by_str.abnormal_name == '7' and by_int == 7
  assert by_str.train.shape[1:] == (32, 32, 3)
  np.testing.assert_array_equal(by_str.train[..., 0], by_str.train[..., 2])  # Gray as RGB.


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('abnormal_class', 'automobile', r"'0'.*'9'"),
    ('abnormal_class', '10', 'no class'),
    ('protocol', 'reference', 'one_class'),
    ('val_fraction', 1.0, 'val_fraction'),
    ('batch_size', 4000, 'batch_size'),
    ('nc', 2, 'nc'),
  ],
)
def test_digit_bad_config(field, value, match):
  with pytest.raises(ValueError, match=match):
    load_splits(make_config(name='mnist_offline', **{'abnormal_class': '0', field: value}))


# ----------------------------------------------------------------------------- TFDS


CIFAR10_NAMES = [
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
]


def write_tfds_metadata(data_dir: pathlib.Path, name: str, num_examples: int, names=None) -> None:
  """Writes the metadata `download_and_prepare` would leave (ArrayRecord, train + test)."""
  builder = tfds.builder(name, data_dir=str(data_dir), file_format='array_record')
  if names:  # cifar10 reads its class names from the download.
    builder.info.features['label'].names = names
  template = tfds.core.ShardedFileTemplate(
    data_dir=builder.data_path, dataset_name=name, filetype_suffix='array_record'
  )
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name=s,
          shard_lengths=[num_examples],
          num_bytes=0,
          filename_template=template.replace(split=s),
        )
        for s in ('train', 'test')
      ]
    )
  )
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


@pytest.fixture
def spy_data_source(monkeypatch):
  calls = []
  real = tfds.data_source

  def spy(name, **kwargs):
    calls.append((name, kwargs['split']))
    return real(name, **kwargs)

  monkeypatch.setattr(tfds, 'data_source', spy)
  return calls


def test_tfds_mnist_mock(tmp_path, spy_data_source):
  # mock_data keeps is_prepared() real: it is True because the metadata exists, and the
  # examples come through the real tfds.data_source -> ArrayRecordDataSource code.
  write_tfds_metadata(tmp_path, 'mnist', 40)
  config = make_config(name='mnist', data_dir=str(tmp_path), abnormal_class='0', batch_size=4)
  config.dataset.update(val_fraction=0.1)
  with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
    labels = [int(tfds.data_source('mnist', split='train', data_dir=str(tmp_path))[i]['label'])
              for i in range(40)]  # fmt: skip
    spy_data_source.clear()
    s = load_splits(config)
  assert spy_data_source == [('mnist', 'train'), ('mnist', 'test')]
  n_abnormal = labels.count(0)  # The mock's train and test splits hold the same examples.
  n_normal = 40 - n_abnormal
  n_val = max(1, int(0.1 * n_normal + 0.5))
  assert (len(s.train), len(s.val)) == (n_normal - n_val, n_val)
  np.testing.assert_array_equal(s.test_labels, np.repeat([0, 1], [n_normal, 2 * n_abnormal]))
  assert s.train.shape[1:] == (32, 32, 3) and s.abnormal_name == '0'


def test_tfds_class_by_name_and_index(tmp_path):
  write_tfds_metadata(tmp_path, 'cifar10', 30, CIFAR10_NAMES)
  results = []
  with tfds.testing.mock_data(num_examples=30, data_dir=str(tmp_path)):
    for cls in ('automobile', '1'):
      config = make_config(name='cifar10', data_dir=str(tmp_path), abnormal_class=cls)
      config.update(batch_size=2, nc=1)
      results.append(load_splits(config))
    names = sources.tfds_class_names('cifar10', str(tmp_path))
    with pytest.raises(ValueError, match=r'automobile.*truck'):
      load_splits(make_config(name='cifar10', data_dir=str(tmp_path), abnormal_class='car'))
  assert {r.abnormal_name for r in results} == {'automobile'}
  assert splits.resolve_class(1, names, 'cifar10') == names.index('automobile')  # An int.
  for r in results[1:]:
    np.testing.assert_array_equal(r.test, results[0].test)
  assert results[0].test.shape[1:] == (32, 32, 1)


def test_tfds_not_prepared_fails_fast(tmp_path):
  start = time.monotonic()
  config = make_config(name='mnist', data_dir=str(tmp_path), abnormal_class='0')
  with pytest.raises(FileNotFoundError, match=r'(?s)prepare_data mnist.*configs/demo\.py'):
    load_splits(config)
  assert time.monotonic() - start < 10
  with pytest.raises(ValueError, match='Unknown dataset'):
    load_splits(make_config(name='no_such_dataset_xyz', data_dir=str(tmp_path)))


def test_prepare_data_without_tensorflow(capsys):
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed')
  assert prepare_data.main(['mnist', '--data_dir', '/nonexistent']) == 1
  assert 'pip install -e .[prepare]' in capsys.readouterr().err


# ----------------------------------------------------------------------------- folders


def save(path: pathlib.Path, mode: str, size: tuple[int, int], fmt: str, seed: int) -> None:
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  channels = {'L': 1, 'RGB': 3, 'RGBA': 4}[mode if mode != 'P' else 'L']
  arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode if mode != 'P' else 'L')
  if mode == 'P':
    img = img.convert('RGB').convert('P')
  img.save(path, format=fmt)


def make_folder(root: pathlib.Path) -> pathlib.Path:
  """A reference-layout dataset with mixed formats, modes and sizes (6 + 3 + 2 images)."""
  train = root / 'train' / '0.normal'
  kinds = [('L', 'PNG', 'png'), ('RGB', 'JPEG', 'jpg'), ('RGBA', 'PNG', 'png'),
           ('P', 'BMP', 'bmp'), ('RGB', 'BMP', 'bmp'), ('L', 'JPEG', 'jpeg')]  # fmt: skip
  for i, (mode, fmt, ext) in enumerate(kinds):
    save(train / ('sub' if i == 5 else '') / f'{i}.{ext}', mode, (20 + 7 * i, 50 - 5 * i), fmt, i)
  for i in range(3):
    save(root / 'test' / '0.normal' / f'n{i}.png', 'RGB', (32, 32), 'PNG', 10 + i)
  for i in range(2):
    save(root / 'test' / '1.abnormal' / f'a{i}.JPG', 'L', (64, 40), 'JPEG', 20 + i)
  (train / 'notes.txt').write_text('not an image')
  (train / '.hidden.png').write_bytes(b'resource fork')
  return root


@pytest.mark.parametrize('nc', [1, 3])
def test_folder_dataset(tmp_path, nc):
  root = make_folder(tmp_path / 'data')
  config = make_config(name='folder', root=str(root), val_fraction=0.2, batch_size=4, nc=nc)
  s = load_splits(config)
  assert (s.train.shape, s.val.shape) == ((5, 32, 32, nc), (1, 32, 32, nc))
  np.testing.assert_array_equal(s.test_labels, [0, 0, 0, 1, 1])
  assert s.abnormal_name == '1.abnormal'
  for i in range(3):  # Normals first, in file-name order; 32x32: untouched.
    want = np.asarray(
      Image.open(root / 'test' / '0.normal' / f'n{i}.png').convert('RGB' if nc == 3 else 'L')
    )
    np.testing.assert_array_equal(s.test[i], want.reshape(32, 32, nc))
  abnormal, paths = ip.load_images(str(root / 'test' / '1.abnormal'), 32, nc)
  assert [pathlib.Path(p).name for p in paths] == ['a0.JPG', 'a1.JPG']
  np.testing.assert_array_equal(s.test[3:], abnormal)


def test_resize_center_crop(tmp_path):
  # 64x32 -> shorter side 32 (no-op resize of 64x32), centre 32 columns: the white middle.
  arr = np.zeros((32, 64, 3), np.uint8)
  arr[:, 8:56] = 255
  Image.fromarray(arr).save(tmp_path / 'wide.png')
  Image.fromarray(arr.transpose(1, 0, 2)).save(tmp_path / 'tall.bmp')
  images, paths = ip.load_images(str(tmp_path), 64, 1)  # Shorter side 32 -> 64.
  assert images.shape == (2, 64, 64, 1) and len(paths) == 2
  assert (images == 255).all()
  one, [path] = ip.load_images(str(tmp_path / 'wide.png'), 32, 3)
  assert one.shape == (1, 32, 32, 3) and path.endswith('wide.png') and (one == 255).all()


def test_folder_bad_inputs(tmp_path):
  root = make_folder(tmp_path / 'data')
  config = make_config(name='folder', root=str(root), batch_size=4)
  with pytest.raises(FileNotFoundError, match='missing_root'):
    load_splits(make_config(name='folder', root=str(tmp_path / 'missing_root')))
  with pytest.raises(FileNotFoundError, match='not a directory'):
    load_splits(make_config(name='folder', root=''))
  config.batch_size = 6  # 6 normal training images, 1 held out for validation.
  with pytest.raises(ValueError, match=r'(?s)Only 5 training images.*batch_size'):
    load_splits(config)
  config.batch_size = 4
  (root / 'test' / '1.abnormal' / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  with pytest.raises(ValueError, match='bad.png'):
    load_splits(config)
  jpeg = (root / 'test' / '1.abnormal' / 'a0.JPG').read_bytes()
  (root / 'test' / '1.abnormal' / 'bad.png').write_bytes(jpeg[: len(jpeg) // 2])  # Truncated.
  with pytest.raises(ValueError, match='bad.png'):
    load_splits(config)
  for f in (root / 'test' / '1.abnormal').iterdir():
    f.unlink()
  with pytest.raises(ValueError, match=r'No image files.*1\.abnormal'):
    load_splits(config)
  os.rmdir(root / 'test' / '1.abnormal')
  with pytest.raises(FileNotFoundError, match=r'1\.abnormal.*found in.*0\.normal'):
    load_splits(config)


def test_load_images_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    ip.load_images(str(tmp_path / 'nothing_here'), 32, 3)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='empty'):
    ip.load_images(str(tmp_path / 'empty'), 32, 3)
  (tmp_path / 'x.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(ValueError, match=r'x\.jpg'):
    ip.load_images(str(tmp_path / 'x.jpg'), 32, 3)


def test_many_files_thread_pool(tmp_path):
  for i in range(300):  # More than one thread-pool chunk.
    save(tmp_path / f'{i:03d}.png', 'L', (8 + i % 5, 8), 'PNG', i)
  (tmp_path / '150.png').write_bytes(b'corrupt')
  with pytest.raises(ValueError, match=r'150\.png'):
    ip.load_images(str(tmp_path), 32, 1)
  (tmp_path / '150.png').unlink()
  images, paths = ip.load_images(str(tmp_path), 32, 3)
  assert images.shape == (299, 32, 32, 3) and paths == sorted(paths)


# ----------------------------------------------------------------------------- batching


def test_to_float():
  out = ip.to_float(np.array([0, 127, 255], np.uint8))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [-1.0, 127 / 127.5 - 1, 1.0], rtol=0, atol=1e-7)
  with pytest.raises(ValueError, match='uint8'):
    ip.to_float(out)


@pytest.mark.parametrize('process_count', [1, 3])
def test_eval_batches_cover_once(process_count):
  images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)
  shares = [list(ip.eval_batches(images, 6, p, process_count)) for p in range(process_count)]
  for batches in shares:
    assert len(batches) == 2  # ceil(10 / 6) in every process.
    for b in batches:
      assert b.shape == (6 // process_count, 4, 4, 1) and b.dtype == np.float32
  # Batch by batch, process by process: the images in order, then zero padding.
  together = np.concatenate([share[i] for i in range(2) for share in shares])
  np.testing.assert_array_equal(together[:10], ip.to_float(images))
  assert (together[10:] == 0).all() and len(together) == 12
  floats = ip.to_float(images)
  np.testing.assert_array_equal(np.concatenate(list(ip.eval_batches(floats, 4)))[:10], floats)
  with pytest.raises(ValueError, match='not divisible'):
    ip.eval_batches(images, 7, 0, 3)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_train_iterator_order_and_resume():
  images = (np.arange(10, dtype=np.uint8) * 12).reshape(10, 1, 1, 1)
  ids = lambda batch: [int(i) for i in ((batch[:, 0, 0, 0] + 1) * 127.5 / 12).round()]
  it = ip.TrainIterator(images, 3, seed=5)
  assert it.steps_per_epoch == 3
  seq = [ids(b) for b in take(it, 9)]
  epoch0, epoch1 = sum(seq[:3], []), sum(seq[3:6], [])
  assert len(set(epoch0)) == 9 and epoch0 != epoch1  # No repeats; a new order each epoch.
  assert epoch0 == list(np.random.default_rng([5, 0]).permutation(10)[:9])
  assert seq == [ids(b) for b in take(ip.TrainIterator(images, 3, seed=5), 9)]
  assert seq != [ids(b) for b in take(ip.TrainIterator(images, 3, seed=6), 9)]
  it = ip.TrainIterator(images, 3, seed=5)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {'epoch': 1, 'step_in_epoch': 2}
  resumed = ip.TrainIterator(images, 3, seed=5)
  resumed.set_state(state)
  assert [ids(b) for b in take(resumed, 4)] == seq[5:9]
  with pytest.raises(ValueError, match='step_in_epoch'):
    resumed.set_state({'epoch': 0, 'step_in_epoch': 4})


def test_train_iterator_multi_process():
  images = np.random.default_rng(1).integers(0, 256, (50, 3, 3, 3), dtype=np.uint8)
  single = take(ip.TrainIterator(images, 12, seed=0), 10)
  shares = [take(ip.TrainIterator(images, 12, 0, p, 4), 10) for p in range(4)]
  for step, batch in enumerate(single):
    assert shares[0][step].shape == (3, 3, 3, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([s[step] for s in shares]), batch)
  with pytest.raises(ValueError, match='not divisible'):
    ip.TrainIterator(images, 12, 0, 0, 5)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    ip.TrainIterator(images[:11], 12, 0)


def test_imports_no_training_code():
  allowed = {'numpy', 'PIL', 'tensorflow_datasets', 'mlxtend', 'jax', 'scipy', 'skimage'}
  package = _ROOT / 'skipganomaly_jax'
  for path in sorted((package / 'data').glob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
      if isinstance(node, ast.ImportFrom):
        names = [node.module or '']
      for name in names:
        top = name.split('.')[0]
        if top == 'skipganomaly_jax':
          # Layer 0 (config, the mesh) and data itself: see tests/test_import_graph.py.
          allowed_own = (
            'skipganomaly_jax.data',
            'skipganomaly_jax.config',
            'skipganomaly_jax.parallel',
          )
          assert name.startswith(allowed_own), (path, name)
        else:
          assert top in allowed or top in sys.stdlib_module_names, (path, name)
