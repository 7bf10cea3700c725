"""The dataset scorer: every image of a dataset on the mesh, and the reference's protocol.

`DatasetScorer` scores every image exactly once across all devices and processes (eval-
mode BatchNorm: each image's score is independent of its batch) and returns the scores
in dataset order on every process. Its `reference_protocol` reproduces the reference
code's evaluation for side-by-side comparison only: BatchNorm in training mode on
unshuffled, normal-first batches of 64, running statistics left untouched. Both compute
`scoring.score_terms`, the one definition of the scores.

`make_scorer` builds the scorer a run's specs ask for (its lambda, compute dtype and
evaluation batch), and `evaluate` is the one evaluation of a model (calibration on the
validation normals, test metrics of both scores, the reference protocol on request), used
by training and by `--mode=eval` alike. Both can stop between batches when asked
(preemption).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from skipganomaly_jax.config import (
  LocalisationSpec,
  ScoreSpec,
  check_batch_divisible,
  compute_dtype,
)
from skipganomaly_jax.data.batches import eval_batches
from skipganomaly_jax.data.images import check_batch_shape, to_float
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.parallel import AXIS, shard_batch
from skipganomaly_jax.scoring import localisation, metrics
from skipganomaly_jax.scoring.scores import normalise_codes, score_terms

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
    check_batch_divisible(global_batch_size, mesh.size, 'eval_batch_size')
    self.mesh, self.global_batch_size = mesh, global_batch_size
    self.spec, self.lam, self.dtype = spec, lam, dtype

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
      code = (self.spec.code_size,)
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
  return score_terms(variables, images, lam, spec, train=True, dtype=dtype)['paper_score']


class Interrupted(Exception):
  """A stop (a preemption notice) was requested between evaluation batches."""


def make_scorer(spec: ModelSpec, score: ScoreSpec, mesh: Mesh) -> DatasetScorer:
  """The dataset scorer of a run: its networks, lambda, compute dtype and eval batch."""
  return DatasetScorer(spec, mesh, score.eval_batch_size, score.lam, compute_dtype(score.dtype))


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


def _reference_auroc(scorer: DatasetScorer, variables, splits, stop) -> float:
  """AUROC of the reference protocol's test scores, checking `stop()` between batches."""
  host = jax.device_get(variables)  # On one local device in each process.
  scores = []
  for start in range(0, len(splits.test), REFERENCE_BATCH):
    _check(stop)
    scores.append(scorer.reference_protocol(host, splits.test[start : start + REFERENCE_BATCH]))
  return metrics.auroc(splits.test_labels, np.concatenate(scores))


def knn_bank(scorer: DatasetScorer, variables, train: np.ndarray, score: ScoreSpec, stop=None):
  """Unit-norm bottleneck codes of (up to score.knn_bank_size) training normals.

  Eval-mode BatchNorm, the model being evaluated; a seeded subset when the training set
  is larger than the cap. Validation and test images are never in the bank.

  Returns:
    (M, code) float32 numpy array.

  Raises:
    Interrupted: `stop()` returned True between batches.
  """
  cap = score.knn_bank_size
  if len(train) > cap:
    pick = np.random.default_rng([score.seed, 2]).choice(len(train), cap, replace=False)
    train = train[np.sort(pick)]
  codes = score_dataset(scorer, variables, train, ('code',), stop)['code']
  return np.asarray(normalise_codes(codes))


def evaluate(
  scorer: DatasetScorer,
  variables,
  splits,
  score: ScoreSpec,
  localisation_spec: LocalisationSpec,
  calibration=None,
  stop=None,
):
  """Evaluates one model: calibration on validation normals, metrics on the test set.

  Args:
    scorer: `make_scorer(spec, score, mesh)`.
    variables: the scoring variables; with a 'knn_bank' the latent k-NN score is
      reported too (training always builds one).
    splits: the run's `DataSplits`.
    score: the run's score spec (kind, threshold_percentile, eval_protocol).
    localisation_spec: the run's localisation settings (maps, map scores).
    calibration: a stored calibration of this model; None fits it on `splits.val`.
    stop: see `score_dataset`.

  Returns:
    (report, calibration, test_scores): the report leads with 'paper_score_auroc' and
    (with a bank) 'latent_knn_auroc'; its 'auroc' etc., the calibration and the test
    scores are of score.kind's score (a map score for 'map_max'/'map_topk');
    with test masks or a map score, localisation's keys ('pixel_auroc', 'pro',
    'map_*_auroc', 'per_defect'); 'reference_protocol_auroc' when
    score.eval_protocol == 'reference'.

  Raises:
    Interrupted: `stop()` returned True.
  """
  key = 'score' if score.kind == 'latent_knn' else 'paper_score'
  val_scores = score_dataset(scorer, variables, splits.val, stop=stop)[key]
  test, labels = score_dataset(scorer, variables, splits.test, stop=stop), splits.test_labels
  test_scores, report = test[key], {'paper_score_auroc': metrics.auroc(labels, test['paper_score'])}
  if 'knn_bank' in variables:  # 'score' is then the latent k-NN score.
    report['latent_knn_auroc'] = metrics.auroc(labels, test['score'])
  if localisation.needed(score.kind, splits):  # Map scores; pixel AUROC, PRO with masks.
    _check(stop)
    host = jax.device_get(variables)
    loc = localisation.evaluate(host, splits, score.kind, localisation_spec)
    report.update(loc.report)
    if loc.test_scores is not None:  # A map score is the run's score.
      val_scores, test_scores = loc.val_scores, loc.test_scores
  if calibration is None:
    calibration = metrics.Calibration.fit(val_scores, score.threshold_percentile)
  report.update(metrics.evaluate(labels, test_scores, calibration))
  report.update(score_kind=score.kind, val_score=float(np.mean(val_scores)))
  if score.eval_protocol == 'reference':
    report['reference_protocol_auroc'] = _reference_auroc(scorer, variables, splits, stop)
  return report, calibration, test_scores
