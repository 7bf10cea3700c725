"""Evaluators: score a whole dataset on the mesh, and the reference's protocol.

`DatasetScorer` scores every image exactly once across all devices and processes (eval-
mode BatchNorm: each image's score is independent of its batch) and returns the scores
in dataset order on every process. `reference_protocol_scores` reproduces the reference
code's evaluation for side-by-side comparison only: BatchNorm in training mode on
unshuffled, normal-first batches of 64, running statistics left untouched.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from skipganomaly_jax import input_pipeline
from skipganomaly_jax.mesh import AXIS, shard_batch
from skipganomaly_jax.models import ModelSpec
from skipganomaly_jax.scoring import score_terms

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

    def per_device(variables, x, keys):
      out = score_terms(variables, x, lam=lam, spec=spec, dtype=dtype)  # Traced once.
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
    """Outputs `keys` of `scoring.score_terms` for all `images`, in order, on every process.

    Args:
      variables: the scoring variables (a 'knn_bank' makes 'score' the latent k-NN one).
      images: uint8 or float [-1, 1] images.
      keys: ('score', 'paper_score') or ('code',).

    Returns:
      dict of numpy arrays with len(images) rows.
    """
    n, step = len(images), self._steps[tuple(keys)]
    batches = input_pipeline.eval_batches(
      images, None, self.global_batch_size, jax.process_index(), jax.process_count()
    )
    out = []
    for batch in batches:
      values = step(variables, shard_batch(batch.images, self.mesh))
      out.append(
        {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in values.items()}
      )
    if not out:
      return {k: np.zeros((0,), np.float32) for k in keys}
    return {k: np.concatenate([o[k] for o in out])[:n] for k in keys}


@functools.partial(jax.jit, static_argnames=('spec', 'lam'))
def _reference_batch(variables, images, spec, lam):
  return score_terms(variables, images, lam, spec, train=True)['paper_score']


def reference_protocol_scores(
  variables, images: np.ndarray, spec: ModelSpec, lam: float
) -> np.ndarray:
  """The reference's test scores: train-mode BatchNorm, in-order batches of 64.

  Each batch is normalised with its own statistics (so a score depends on its batch
  neighbours); the last partial batch keeps its size, as the reference's loader does.
  Runs on one device; results are identical on every process.
  """
  out = []
  for start in range(0, len(images), REFERENCE_BATCH):
    chunk = input_pipeline.to_float(images[start : start + REFERENCE_BATCH])
    out.append(np.asarray(_reference_batch(variables, jnp.asarray(chunk), spec, lam)))
  return np.concatenate(out)
