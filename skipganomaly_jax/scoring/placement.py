"""Where evaluation's arrays live: weights placed once, batches dispatched ahead.

An evaluation keeps the networks on the devices from start to end: a host copy of the
weights passed to a compiled function would be uploaded again on every call (~71 MB per
batch for the paper's model). Each batch is uploaded explicitly (`jax.device_put`), up
to IN_FLIGHT batches are computed ahead of the host, and the results come back to the
host once, at the end (`host_copy`). On an accelerator the device then never waits for
the host between batches. tests/test_device_resident.py runs an evaluation under
`jax.transfer_guard('disallow')`, which refuses any implicit transfer, to keep it so.
"""

import jax

IN_FLIGHT = 2  # Batches dispatched ahead of the one the host waits for (bounds memory).


def on_one_device(tree, device=None):
  """`tree` on one device, copied only where it is not already there.

  A leaf that already has a full copy on `device` (a replicated array of the mesh, or
  one on that device) is used as it is, without a transfer; any other leaf is placed
  there with one explicit `jax.device_put`. For replicated arrays of several processes
  this gives each process a local copy: compiled functions of it run in that process
  alone (no collective), as host copies did.

  Args:
    tree: a pytree of jax or numpy arrays.
    device: where; default this process's first local device.
  """
  device = device or jax.local_devices()[0]

  def place(leaf):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        if shard.device == device and shard.data.shape == leaf.shape:
          return shard.data
    return jax.device_put(leaf, device)

  return jax.tree.map(place, tree)


def device_of(tree):
  """The device of the first jax array leaf of `tree` (one placed by `on_one_device`)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      return next(iter(leaf.devices()))
  return jax.local_devices()[0]


def host_copy(tree):
  """Numpy copies of `tree`'s arrays (replicated ones: their local copy), explicitly."""
  return jax.device_get(
    jax.tree.map(lambda a: a.addressable_data(0) if a.is_fully_replicated else a, tree)
  )


class InFlight:
  """The outputs of dispatched batches, at most `depth` ahead of the last finished one.

  `add` waits (on the device, no transfer) for the output `depth` batches back, so the
  host never queues the whole dataset's inputs on the device, yet the device always has
  the next batch to compute.
  """

  def __init__(self, depth: int = IN_FLIGHT):
    self.outputs, self._depth = [], depth

  def add(self, output) -> None:
    """Records one dispatched batch's output; waits for the one `depth` batches back."""
    self.outputs.append(output)
    if len(self.outputs) > self._depth:
      jax.block_until_ready(self.outputs[-self._depth - 1])
