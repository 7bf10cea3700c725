"""Deterministic multi-process batching of in-memory images.

Every process holds the full arrays and computes the same global batches; process p of
P takes rows [p * B/P, (p + 1) * B/P) of each global batch of B. So P processes together
see exactly what one process with the global batch sees, and training can resume from an
(epoch, step) pair alone.
"""

from collections.abc import Iterator

import numpy as np

from skipganomaly_jax.config import check_batch_divisible
from skipganomaly_jax.data.images import to_float


def _local_batch_size(
  global_batch_size: int, process_index: int, process_count: int, field: str = 'batch_size'
) -> int:
  """global_batch_size // process_count, after checking the arguments.

  `field` names the config field of the batch in the divisibility error.
  """
  if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int | np.integer):
    raise ValueError(f'The global batch size must be an int, got {global_batch_size!r}.')
  if global_batch_size < 1 or process_count < 1:
    raise ValueError(
      f'Need a positive global batch and process count, got {global_batch_size} and '
      f'{process_count}.'
    )
  check_batch_divisible(global_batch_size, process_count, field, 'processes')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  return int(global_batch_size) // process_count


class TrainIterator:
  """Infinite iterator of this process's share of global training batches.

  Epoch e visits `np.random.default_rng([seed, e]).permutation(N)` in global batches of
  global_batch_size (the last partial batch is dropped); the order is the same in every
  process, which takes its own rows of each global batch.

  Attributes:
    steps_per_epoch: len(images) // global_batch_size.
    local_batch_size: global_batch_size // process_count.
  """

  def __init__(
    self,
    images: np.ndarray,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    """Initialises the iterator at epoch 0, step 0.

    Args:
      images: uint8 (N, H, W, C) training images (kept by reference, not copied).
      global_batch_size: images per step over all processes.
      seed: shuffling seed (a non-negative int).
      process_index: this process, in [0, process_count).
      process_count: number of processes sharing each global batch.
    """
    self.local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    if len(images) < global_batch_size:
      raise ValueError(
        f'{len(images)} training images are fewer than one global batch of '
        f'{global_batch_size}: lower --config.batch_size or add training images.'
      )
    self._images = images
    self._global = int(global_batch_size)
    self._seed = int(seed)
    self._offset = process_index * self.local_batch_size
    self.steps_per_epoch = len(images) // self._global
    self._epoch, self._step = 0, 0
    self._perm_epoch, self._perm = -1, None

  def __iter__(self) -> 'TrainIterator':
    return self

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._images))
      self._perm_epoch = epoch
    return self._perm

  def __next__(self) -> np.ndarray:
    """The next local batch: float32 [-1, 1], (global_batch_size // process_count, H, W, C)."""
    if self._step >= self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    start = self._step * self._global + self._offset
    rows = self._permutation(self._epoch)[start : start + self.local_batch_size]
    self._step += 1
    return to_float(self._images[rows])

  def get_state(self) -> dict:
    """The position as JSON-serialisable ints: {'epoch': e, 'step_in_epoch': s}."""
    return {'epoch': int(self._epoch), 'step_in_epoch': int(self._step)}

  def close(self) -> None:
    """Nothing to release (PrefetchIterator's stops its thread): one interface for all."""

  def set_state(self, state: dict) -> None:
    """Resumes from a `get_state()` dict: the next batch is the one that followed it."""
    epoch, step = int(state['epoch']), int(state['step_in_epoch'])
    if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
      raise ValueError(
        f'Invalid iterator state {state!r}: step_in_epoch must be in '
        f'[0, {self.steps_per_epoch}] and epoch >= 0 (did the dataset or batch size change?).'
      )
    self._epoch, self._step = epoch, step


def eval_batches(
  images: np.ndarray,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[np.ndarray]:
  """Covers every image exactly once across processes, in full-shape (padded) batches.

  Every process yields ceil(N / global_batch_size) batches of the same shape, so a
  jitted function never recompiles and collective ops stay in step. Process p's rows
  of batch b are images[b * B + p * B/P : b * B + (p + 1) * B/P] (B = global batch, P
  processes); rows past the end are zeros. So the outputs of all processes, batch by
  batch and process by process, are the images in order followed by padding.

  Args:
    images: uint8 [0, 255] or float [-1, 1] images (N, H, W, C).
    global_batch_size: images per batch over all processes.
    process_index: this process, in [0, process_count).
    process_count: number of processes.

  Returns:
    An iterator of float32 [-1, 1] arrays (global_batch_size // process_count, H, W, C).
    Arguments are checked when this is called.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count, 'eval_batch_size')
  return _eval_batches(images, int(global_batch_size), local, process_index)


def _eval_batches(images, global_batch_size, local, process_index):
  n = len(images)
  for start in range(0, n, global_batch_size):
    first = min(n, start + process_index * local)
    chunk = images[first : min(n, first + local)]
    batch = np.zeros((local, *images.shape[1:]), np.float32)
    batch[: len(chunk)] = to_float(chunk) if chunk.dtype == np.uint8 else chunk
    yield batch
