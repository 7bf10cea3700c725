"""Data protocols (docs/method.md, "Data protocols") and the validation slice.

- 'one_class' (skip-ganomaly): train = the normal classes' train-split images; test = the
  normal test-split images, then ALL abnormal images (train split, then test split).
- 'ganomaly' (GANomaly's MNIST protocol): the normal images of both splits are pooled,
  shuffled with `np.random.default_rng(seed)`, 80% train / 20% normal test; the test set
  adds all abnormal images.
Then a seeded random `val_fraction` of the normal training images (at least one when
val_fraction > 0; `np.random.default_rng([seed, 1])`) moves from train to validation.
Folder datasets use their own train/test folders (the 'one_class' rule, abnormal =
'1.abnormal'); the offline digits are one pool, split 80/20 per digit into 'train'/'test'.
An arrays file (.npz) without 'is_test' has no splits: it takes the pooled 'ganomaly'
protocol only, and asking for 'one_class' is an error (never a silent fallback).
"""

import dataclasses

import numpy as np

from skipganomaly_jax.config import DATASET_PROTOCOLS as PROTOCOLS
from skipganomaly_jax.config import DataSpec
from skipganomaly_jax.data import sources

GANOMALY_TRAIN_FRACTION = 0.8


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """Training, validation and test images of one anomaly-detection task.

  Attributes:
    train: uint8 (N, isize, isize, nc) normal training images (validation removed).
    val: uint8 held-out normal training images (never trained on).
    test: uint8 test images, normals first.
    test_labels: int32 (N,): 0 normal, 1 abnormal.
    abnormal_name: name of the abnormal class (e.g. '0', 'automobile', '1.abnormal').
    test_paths: the file of each test image (folder and MVTec datasets; read to find the
      masks of folder datasets and to name per-defect results).
    test_masks: uint8 (N, isize, isize) defect masks in {0, 1} of the test images, when
      the source has them (data/mvtec.py); all zero for normal images.
  """

  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  test_labels: np.ndarray
  abnormal_name: str
  test_paths: tuple[str, ...] | None = None
  test_masks: np.ndarray | None = None  # Localisation: data/mvtec.py, folder masks.


def resolve_class(abnormal_class: int | str, class_names: tuple[str, ...], dataset: str) -> int:
  """The index of the abnormal class, given as an index (int or digit string) or a name.

  Args:
    abnormal_class: e.g. 3, '3' or 'automobile' (a name matches before a digit string).
    class_names: the dataset's class names, by index.
    dataset: the dataset name, for the error message.

  Returns:
    The class index.

  Raises:
    ValueError: the dataset has no such class (the message lists the valid ones).
  """
  index = None
  if isinstance(abnormal_class, str):
    if abnormal_class in class_names:
      index = class_names.index(abnormal_class)
    elif abnormal_class.strip().isdigit():
      index = int(abnormal_class)
  elif isinstance(abnormal_class, int | np.integer) and not isinstance(abnormal_class, bool):
    index = int(abnormal_class)
  if index is None or not 0 <= index < len(class_names):
    valid = ', '.join(f'{i}={n!r}' for i, n in enumerate(class_names))
    raise ValueError(
      f'Dataset {dataset!r} has no class {abnormal_class!r}. Set '
      f'--config.dataset.abnormal_class to an index or a name: {valid}.'
    )
  return index


def validation_slice(train: np.ndarray, val_fraction: float, seed: int):
  """Moves a seeded random val_fraction of train (indices) to validation.

  Runs check val_fraction in (0, 1) (skipganomaly_jax/config/); 0 (no validation) is allowed here.
  """
  if not 0.0 <= val_fraction < 1.0:  # Direct use only: a run's spec is checked.
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction!r}.')
  n_val = 0 if val_fraction == 0 else max(1, int(val_fraction * len(train) + 0.5))
  if n_val >= len(train):
    raise ValueError(
      f'val_fraction={val_fraction} of {len(train)} normal training images leaves none '
      'to train on: lower --config.dataset.val_fraction or add training images.'
    )
  in_val = np.zeros(len(train), bool)
  in_val[np.random.default_rng([seed, 1]).choice(len(train), n_val, replace=False)] = True
  return train[~in_val], train[in_val]


def protocol_indices(
  labels: np.ndarray,
  is_test: np.ndarray,
  abnormal: int,
  protocol: str,
  seed: int,
  val_fraction: float,
) -> dict[str, np.ndarray]:
  """Indices into a pool of each part of the task.

  Args:
    labels: int (N,) class labels of the pool.
    is_test: bool (N,): the pool's test-split images; None if the pool has no split
      (only 'ganomaly' then applies).
    abnormal: the abnormal class index.
    protocol: 'one_class' or 'ganomaly'.
    seed: seeds the 'ganomaly' shuffle and the validation slice.
    val_fraction: fraction of the normal training images held out.

  Returns:
    Disjoint int64 index arrays 'train', 'val', 'test_normal', 'test_abnormal'.
  """
  if protocol not in PROTOCOLS:  # Direct use only: a run's spec is checked.
    raise ValueError(f'protocol must be one of {PROTOCOLS}, got {protocol!r}.')
  if is_test is None:
    if protocol != 'ganomaly':
      raise ValueError(
        f"Protocol {protocol!r} needs the pool's own train/test split, and this dataset has "
        "none (an arrays .npz without 'is_test'): set --config.dataset.protocol=ganomaly "
        "(pooled, seeded 80/20) or add a bool 'is_test' array to the file."
      )
    is_test = np.zeros(len(labels), bool)
  normal = labels != abnormal
  normal_train = np.flatnonzero(normal & ~is_test)
  normal_test = np.flatnonzero(normal & is_test)
  if protocol == 'ganomaly':
    pooled = np.concatenate([normal_train, normal_test])
    pooled = pooled[np.random.default_rng(seed).permutation(len(pooled))]
    n_train = int(len(pooled) * GANOMALY_TRAIN_FRACTION)
    normal_train, normal_test = pooled[:n_train], pooled[n_train:]
  if not len(normal_train):
    raise ValueError(
      f'No normal training images with abnormal class {abnormal} under protocol '
      f'{protocol!r}: every image is of that class or in the test split. Pick another '
      '--config.dataset.abnormal_class or protocol, or add normal training images.'
    )
  train, val = validation_slice(normal_train, val_fraction, seed)
  test_abnormal = np.concatenate(
    [np.flatnonzero(~normal & ~is_test), np.flatnonzero(~normal & is_test)]
  )
  return {'train': train, 'val': val, 'test_normal': normal_test, 'test_abnormal': test_abnormal}


def _load_pool(ds: DataSpec) -> tuple[sources.Pool, int, str]:
  """The source's pool, the abnormal class index and the protocol to apply."""
  isize, nc = ds.isize, ds.nc
  if ds.name == sources.FOLDER:
    return sources.folder_pool(ds.root, isize, nc), 1, 'one_class'
  if ds.name == sources.ARRAYS:
    pool = sources.arrays_pool(ds.path, isize, nc)
    abnormal = resolve_class(ds.abnormal_class, pool.class_names, f'{ds.name} ({ds.path})')
    if not np.any(pool.labels == abnormal):
      raise ValueError(
        f'{ds.path} has no image of the abnormal class {pool.class_names[abnormal]!r} '
        f'(label {abnormal}): pick another --config.dataset.abnormal_class.'
      )
    return pool, abnormal, ds.protocol
  if ds.name == sources.MNIST_OFFLINE:
    abnormal = resolve_class(ds.abnormal_class, sources.DIGITS, ds.name)
    return sources.mnist_offline_pool(isize, nc, ds.seed), abnormal, ds.protocol
  names = sources.tfds_class_names(ds.name, ds.data_dir)
  abnormal = resolve_class(ds.abnormal_class, names, ds.name)
  return sources.tfds_pool(ds.name, ds.data_dir, isize, nc), abnormal, ds.protocol


def load_splits(ds: DataSpec) -> DataSplits:
  """Loads a dataset and applies its protocol and validation slice.

  Args:
    ds: the run's data spec: name, data_dir, root, path, abnormal_class, protocol, seed,
      val_fraction, isize, nc and batch_size (the global training batch).

  Returns:
    The task's `DataSplits`.

  Raises:
    FileNotFoundError: missing folder, or a TFDS dataset that is not prepared.
    ValueError: any other bad input (the message names the value and the fix).
  """
  pool, abnormal, protocol = _load_pool(ds)
  idx = protocol_indices(pool.labels, pool.is_test, abnormal, protocol, ds.seed, ds.val_fraction)
  if len(idx['train']) < ds.batch_size:
    raise ValueError(
      f'Only {len(idx["train"])} training images (after holding out {len(idx["val"])} '
      f'for validation) for a global batch of {ds.batch_size}: lower '
      '--config.batch_size or --config.dataset.val_fraction, or add training images.'
    )
  if not len(idx['test_normal']) or not len(idx['test_abnormal']):
    raise ValueError(
      f'The test set of {ds.name!r} needs normal and abnormal images; it has '
      f'{len(idx["test_normal"])} normal and {len(idx["test_abnormal"])} abnormal.'
    )
  test_idx = np.concatenate([idx['test_normal'], idx['test_abnormal']])
  test_labels = np.repeat(
    np.array([0, 1], np.int32), [len(idx['test_normal']), len(idx['test_abnormal'])]
  )
  return DataSplits(
    train=pool.images[idx['train']],
    val=pool.images[idx['val']],
    test=pool.images[test_idx],
    test_labels=test_labels,
    abnormal_name=pool.class_names[abnormal],
    test_paths=None if pool.paths is None else tuple(pool.paths[i] for i in test_idx),
  )
