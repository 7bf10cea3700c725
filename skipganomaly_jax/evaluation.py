"""Evaluators: score a whole dataset on the mesh, and the reference's protocol.

`DatasetScorer` scores every image exactly once across all devices and processes (eval-
mode BatchNorm: each image's score is independent of its batch) and returns the scores
in dataset order on every process. `reference_protocol_scores` reproduces the reference
code's evaluation for side-by-side comparison only: BatchNorm in training mode on
unshuffled, normal-first batches of 64, running statistics left untouched.

`make_scorer` builds the scorer a run's config asks for (its lambda, compute dtype and
evaluation batch), and `evaluate` is the one evaluation of a model (calibration on the
validation normals, test metrics, the reference protocol on request), used by training
and by `--mode=eval` alike. Both can stop between batches when asked (preemption).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from skipganomaly_jax import input_pipeline, metrics
from skipganomaly_jax.mesh import AXIS, shard_batch
from skipganomaly_jax.models import ModelSpec
from skipganomaly_jax.run_config import compute_dtype
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


class Interrupted(Exception):
  """A stop (a preemption notice) was requested between evaluation batches."""


def make_scorer(config, mesh: Mesh) -> DatasetScorer:
  """The dataset scorer of a run's config: its score_lambda, dtype and eval_batch_size."""
  return DatasetScorer(
    ModelSpec.from_config(config),
    mesh,
    config.eval_batch_size,
    config.score_lambda,
    compute_dtype(config),
  )


def _check(should_stop) -> None:
  if should_stop is not None and should_stop():
    raise Interrupted


def score_dataset(
  scorer: DatasetScorer, variables, images: np.ndarray, keys=('score', 'paper_score'), stop=None
) -> dict:
  """`scorer(variables, images, keys)`, one global batch at a time, checking `stop()`.

  Args:
    scorer: the dataset scorer.
    variables: the scoring variables.
    images: the images to score.
    keys: the outputs wanted (see `DatasetScorer.__call__`).
    stop: None, or a function called before each batch (in every process alike); True
      raises `Interrupted`.

  Returns:
    dict of numpy arrays with len(images) rows, equal to one call on all images (the
    batches are the scorer's own).
  """
  size = scorer.global_batch_size
  if stop is None or len(images) <= size:
    _check(stop)
    return scorer(variables, images, keys)
  parts = []
  for start in range(0, len(images), size):
    _check(stop)
    parts.append(scorer(variables, images[start : start + size], keys))
  return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _reference_auroc(variables, splits, spec: ModelSpec, lam: float, stop) -> float:
  """AUROC of the reference protocol's test scores, checking `stop()` between batches."""
  host = jax.device_get(variables)  # On one local device in each process.
  scores = []
  for start in range(0, len(splits.test), REFERENCE_BATCH):
    _check(stop)
    chunk = splits.test[start : start + REFERENCE_BATCH]
    scores.append(reference_protocol_scores(host, chunk, spec, lam))
  return metrics.auroc(splits.test_labels, np.concatenate(scores))


def evaluate(scorer: DatasetScorer, variables, splits, config, calibration=None, stop=None):
  """Evaluates one model: calibration on validation normals, metrics on the test set.

  Args:
    scorer: `make_scorer(config, mesh)`.
    variables: the scoring variables (with the 'knn_bank' for the latent k-NN score).
    splits: the run's `DataSplits`.
    config: the run's config (threshold_percentile, eval_protocol, score_lambda).
    calibration: a stored calibration of this model; None fits it on `splits.val`.
    stop: see `score_dataset`.

  Returns:
    (report, calibration, test_scores): the report's 'auroc' etc. are of the run's
    score_kind, 'paper_score_auroc' always of the paper score, and
    'reference_protocol_auroc' is there when config.eval_protocol == 'reference'.

  Raises:
    Interrupted: `stop()` returned True.
  """
  val_scores = score_dataset(scorer, variables, splits.val, stop=stop)['score']
  if calibration is None:
    calibration = metrics.Calibration.fit(val_scores, config.threshold_percentile)
  test = score_dataset(scorer, variables, splits.test, stop=stop)
  report = metrics.evaluate(splits.test_labels, test['score'], calibration)
  report['val_score'] = float(np.mean(val_scores))
  report['paper_score_auroc'] = metrics.auroc(splits.test_labels, test['paper_score'])
  if config.eval_protocol == 'reference':
    spec = ModelSpec.from_config(config)
    report['reference_protocol_auroc'] = _reference_auroc(
      variables, splits, spec, config.score_lambda, stop
    )
  return report, calibration, test['score']
