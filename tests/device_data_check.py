"""Runs in a subprocess with 4 simulated CPU devices (see test_device_data.py).

Prints, as JSON, whether every device's rows of every DeviceTrainIterator batch equal
(exactly) the host path's: `mesh.shard_batch` of TrainIterator's batches, and each
device's share as if each device were a process (TrainIterator with process_index=d).
"""

import json
import sys

import jax
import numpy as np

from skipganomaly_jax import parallel as mesh_lib
from skipganomaly_jax.data import input_pipeline as ip


def main(seed: int) -> None:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (37, 4, 4, 3), dtype=np.uint8)
  mesh = mesh_lib.make_mesh()
  device_it = ip.DeviceTrainIterator(images, 8, seed, mesh)
  host_it = ip.TrainIterator(images, 8, seed)
  per_device = [ip.TrainIterator(images, 8, seed, d, mesh.size) for d in range(mesh.size)]
  same_global, same_shards, same_as_processes = True, True, True
  for _ in range(11):  # 4 steps per epoch: crosses two epoch boundaries.
    got = next(device_it)
    host = mesh_lib.shard_batch(next(host_it), mesh)
    same_global &= np.array_equal(np.asarray(got), np.asarray(host))
    want_shards = {s.device: np.asarray(s.data) for s in host.addressable_shards}
    shards = sorted(got.addressable_shards, key=lambda s: mesh.devices.tolist().index(s.device))
    for d, shard in enumerate(shards):
      same_shards &= np.array_equal(np.asarray(shard.data), want_shards[shard.device])
      same_as_processes &= np.array_equal(np.asarray(shard.data), next(per_device[d]))
  print(
    json.dumps(
      {
        'devices': jax.device_count(),
        'same_global': bool(same_global),
        'same_shards': bool(same_shards),
        'same_as_processes': bool(same_as_processes),
        'sharding': str(got.sharding.spec),
      }
    )
  )


if __name__ == '__main__':
  main(int(sys.argv[1]))
