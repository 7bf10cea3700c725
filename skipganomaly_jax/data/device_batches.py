"""Device-resident training data: TrainIterator's batches, gathered on the devices.

The uint8 training images are copied once to every device of the mesh (replicated);
each step gathers that step's rows there and scales them to float32 [-1, 1], so a GPU or
TPU step never waits for a host-to-device copy of its batch. The order is exactly
`TrainIterator`'s: epoch e visits `np.random.default_rng([seed, e]).permutation(N)` (made
on the host once per epoch: N int32 indices uploaded, a few hundred KB), the last
partial batch is dropped, and device d of D takes rows [d * B/D, (d + 1) * B/D) of each
global batch of B, which is what `parallel.shard_batch` of the host batches gives. So a run
with `config.device_data='on'` trains on the same batches, and ends with the same
parameters, as one with 'off'; resuming from a checkpoint's iterator state works with
either.

`config.device_data`: 'on', 'off' or 'auto' (default): on when the uint8 training set
is at most DEVICE_DATA_MAX_BYTES (1 GiB) and at most 1/8 of a device's memory where the
backend reports it. CIFAR-10 (45,000 x 32x32x3 = 138 MB) and MNIST (47 MB) qualify;
ImageNet-sized sets stay on the host, batched ahead by a background thread (prefetch.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from skipganomaly_jax.config import check_batch_divisible, check_field
from skipganomaly_jax.data.batches import TrainIterator
from skipganomaly_jax.data.images import to_float
from skipganomaly_jax.data.prefetch import PrefetchIterator
from skipganomaly_jax.parallel import shard_batch

DEVICE_DATA_MAX_BYTES = 1 << 30  # 'auto': the most bytes of training images kept on devices.


def use_device_data(setting, nbytes: int, devices=None) -> bool:
  """Whether `config.device_data` = setting keeps `nbytes` of training images on devices.

  Args:
    setting: 'auto', 'on' or 'off' (True / False are read as 'on' / 'off').
    nbytes: size of the uint8 training images.
    devices: the devices that would each hold a copy (default: jax.local_devices()).

  Returns:
    True for 'on'; False for 'off'; for 'auto', whether nbytes is at most
    DEVICE_DATA_MAX_BYTES and at most 1/8 of the smallest reported device memory.
  """
  setting = {True: 'on', False: 'off'}.get(setting, setting)
  check_field('device_data', setting)
  if setting != 'auto':
    return setting == 'on'
  limit = DEVICE_DATA_MAX_BYTES
  for device in devices or jax.local_devices():
    stats = device.memory_stats() or {}  # None / {} on CPU.
    if stats.get('bytes_limit'):
      limit = min(limit, stats['bytes_limit'] // 8)
  return nbytes <= limit


@functools.partial(jax.jit, static_argnames=('mesh', 'local'))
def _gather(images, perm, start, *, mesh: Mesh, local: int):
  """Each device's rows [start + d * local, start + (d + 1) * local) of perm, as floats."""
  axis = mesh.axis_names[0]

  def rows(images, perm, start):
    first = start + jax.lax.axis_index(axis) * local
    index = jax.lax.dynamic_slice_in_dim(perm, first, local)
    batch = jnp.take(images, index, axis=0, mode='clip')
    # to_float's values looked up, not recomputed: XLA may turn the division into a
    # multiplication by 1/127.5, which differs in the last bit for some values.
    return jnp.take(_FLOAT_OF_UINT8, batch.astype(jnp.int32), mode='clip')

  return jax.shard_map(rows, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P(axis))(
    images, perm, start
  )


_FLOAT_OF_UINT8 = to_float(np.arange(256, dtype=np.uint8))  # The host path's exact values.


class DeviceTrainIterator(TrainIterator):
  """`TrainIterator` whose batches are global arrays gathered on the mesh's devices.

  Same order, epochs, `steps_per_epoch`, `get_state` / `set_state` as TrainIterator;
  `next()` returns a float32 [-1, 1] jax.Array of the global batch (B, H, W, C), sharded
  over the mesh's (1-D) axis, ready for the train step (no `shard_batch`).
  """

  def __init__(self, images: np.ndarray, global_batch_size: int, seed: int, mesh: Mesh):
    """Copies the images to every device of `mesh` (each process passes all of them).

    Args:
      images: uint8 (N, H, W, C) training images, the same in every process.
      global_batch_size: images per step over all devices (a multiple of the mesh size).
      seed: shuffling seed.
      mesh: the 1-D data-parallel mesh of the train step.
    """
    if images.dtype != np.uint8:
      raise ValueError(f'Device-resident images must be uint8, got {images.dtype}.')
    check_batch_divisible(global_batch_size, mesh.size)
    super().__init__(images, global_batch_size, seed)
    self._mesh, self._device_local = mesh, global_batch_size // mesh.size
    self._replicated = NamedSharding(mesh, P())
    self._device_images = jax.device_put(images, self._replicated)
    self._device_perm_epoch, self._device_perm = -1, None

  def __next__(self) -> jax.Array:
    if self._step >= self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    if self._device_perm_epoch != self._epoch:
      perm = self._permutation(self._epoch).astype(np.int32)
      self._device_perm = jax.device_put(perm, self._replicated)
      self._device_perm_epoch = self._epoch
    start = np.int32(self._step * self._global)
    self._step += 1
    return _gather(
      self._device_images, self._device_perm, start, mesh=self._mesh, local=self._device_local
    )


def train_iterator(images, global_batch_size: int, seed: int, mesh: Mesh, device_data='auto'):
  """The run's training iterator: device-resident if `use_device_data`, else host batches.

  Args:
    images: uint8 (N, H, W, C) training images (all of them, in every process).
    global_batch_size: images per step over all devices of all processes.
    seed: shuffling seed.
    mesh: the 1-D data-parallel mesh over all devices.
    device_data: `config.device_data` ('auto', 'on' or 'off').

  Returns:
    A DeviceTrainIterator, or a PrefetchIterator over a TrainIterator: this process's
    rows made and placed on the mesh (`parallel.shard_batch`) by a background thread,
    PREFETCH_BATCHES ahead of the training loop. Both return global jax.Arrays, in
    the same order; close the PrefetchIterator to stop its thread.
  """
  if use_device_data(device_data, images.nbytes, mesh.local_devices):
    return DeviceTrainIterator(images, global_batch_size, seed, mesh)
  host = TrainIterator(images, global_batch_size, seed, jax.process_index(), jax.process_count())
  return PrefetchIterator(host, place=functools.partial(shard_batch, mesh=mesh))
