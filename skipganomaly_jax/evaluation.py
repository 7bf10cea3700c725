"""The dataset scorer: every image of a dataset on the mesh, and the reference's protocol.

`DatasetScorer` scores every image exactly once across all devices and processes (eval-
mode BatchNorm: each image's score is independent of its batch) and returns the scores
in dataset order on every process. Its `reference_protocol` reproduces the reference
code's evaluation for side-by-side comparison only: BatchNorm in training mode on
unshuffled, normal-first batches of 64, running statistics left untouched. Both compute
`scoring._score_terms`, the one definition of the scores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from skipganomaly_jax.data.batches import eval_batches
from skipganomaly_jax.data.images import check_batch_shape, to_float
from skipganomaly_jax.models import ModelSpec
from skipganomaly_jax.scoring import _score_terms
from skipganomaly_jax.train_step import AXIS, shard_batch

REFERENCE_BATCH = 64  # The reference's test batch size.


class DatasetScorer:
  """Scores datasets with eval-mode BatchNorm, data-parallel over a mesh.

  Args:
    spec: the architecture.
    mesh: the 1-D data-parallel mesh.
    global_batch_size: images per evaluation batch over all devices (padded at the end).
    lam: weight of the reconstruction term in the paper score.
    dtype: compute dtype.
  """

  def __init__(
    self, spec: ModelSpec, mesh: Mesh, global_batch_size: int, lam: float, dtype=jnp.float32
  ):
    if global_batch_size % mesh.size:
      raise ValueError(
        f'eval_batch_size {global_batch_size} must be a multiple of the device count {mesh.size}.'
      )
    self.mesh, self.global_batch_size = mesh, global_batch_size
    self.spec, self.lam, self.dtype = spec, lam, dtype

    def per_device(variables, x, keys):
      out = _score_terms(variables, x, lam=lam, spec=spec, dtype=dtype)  # Traced once.
      return {k: out[k] for k in keys}

    self._steps = {
      keys: jax.jit(
        jax.shard_map(
          functools.partial(per_device, keys=keys),
          mesh=mesh,
          in_specs=(P(), P(AXIS)),
          out_specs=P(AXIS),
        )
      )
      for keys in (('score', 'paper_score'), ('code',))
    }

  def __call__(self, variables, images: np.ndarray, keys=('score', 'paper_score')) -> dict:
    """Outputs `keys` of the scores for all `images`, in order, on every process.

    Args:
      variables: the scoring variables (a 'knn_bank' makes 'score' the latent k-NN one).
      images: (N, isize, isize, nc) uint8 or float [-1, 1] images.
      keys: ('score', 'paper_score') or ('code',).

    Returns:
      dict of numpy arrays with len(images) rows.
    """
    check_batch_shape(np.shape(images), self.spec.isize, self.spec.nc)
    n, step = len(images), self._steps[tuple(keys)]
    batches = eval_batches(images, self.global_batch_size, jax.process_index(), jax.process_count())
    out = []
    for batch in batches:
      values = step(variables, shard_batch(batch, self.mesh))
      out.append(
        {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in values.items()}
      )
    if not out:
      code = (8 * self.spec.ngf,)
      return {k: np.zeros((0, *(code if k == 'code' else ())), np.float32) for k in keys}
    return {k: np.concatenate([o[k] for o in out])[:n] for k in keys}

  def reference_protocol(self, variables, images: np.ndarray) -> np.ndarray:
    """The reference's test scores (paper score): train-mode BatchNorm, in-order batches of 64.

    Each batch is normalised with its own statistics (so a score depends on its batch
    neighbours); the last partial batch keeps its size, as the reference's loader does.
    Runs on one device; results are identical on every process.

    Args:
      variables: the scoring variables, on the host (jax.device_get).
      images: (N, isize, isize, nc) uint8 images, in the reference's order.

    Returns:
      (N,) numpy paper scores.
    """
    check_batch_shape(np.shape(images), self.spec.isize, self.spec.nc)
    out = []
    for start in range(0, len(images), REFERENCE_BATCH):
      chunk = jnp.asarray(to_float(images[start : start + REFERENCE_BATCH]))
      out.append(np.asarray(_reference_batch(variables, chunk, self.spec, self.lam, self.dtype)))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@functools.partial(jax.jit, static_argnames=('spec', 'dtype'))
def _reference_batch(variables, images, spec, lam, dtype):
  return _score_terms(variables, images, lam, spec, train=True, dtype=dtype)['paper_score']
