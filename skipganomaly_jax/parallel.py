"""The 1-D data-parallel device mesh and the placement of arrays on it.

Separate from the training step so that evaluation and loading a trained model need
neither the optimiser nor the losses.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'batch'  # The data-parallel mesh axis.


def make_mesh(devices=None) -> Mesh:
  """A 1-D data-parallel mesh over all devices of all processes."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places a pytree (identical in every process) replicated on all mesh devices."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's share of a global batch -> one global array split over devices."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local_batch)
