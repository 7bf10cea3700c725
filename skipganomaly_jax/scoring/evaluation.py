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

Nothing here waits for the host between batches (placement.py): the variables are
placed on the devices once per evaluation, batches are dispatched ahead and the outputs
gathered once per dataset; the k-NN bank never leaves the devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
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
from skipganomaly_jax.scoring import localisation, metrics, placement
from skipganomaly_jax.scoring.scores import normalise_codes, score_terms

REFERENCE_BATCH = 64  # The reference's test batch size.


class DatasetScorer:
  """Scores datasets with eval-mode BatchNorm, data-parallel over a mesh.

  The variables are placed on the mesh once per call (`place`; a no-op for variables
  already there, as an evaluation passes them), every batch is dispatched ahead of the
  host (`placement.InFlight`) and the outputs are gathered once, at the end.

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
    self._replicated = NamedSharding(mesh, P())
    # The batches' outputs joined on the devices, replicated: in several processes the
    # gather is this program's collective, not one host round trip per batch.
    self._join = jax.jit(_join, static_argnums=1, out_shardings=self._replicated)
    self._bank = jax.jit(_unit_codes, static_argnums=1, out_shardings=self._replicated)
    # lam is closed over: a Python float argument would be a host-to-device transfer.
    self._reference = jax.jit(functools.partial(_reference_scores, spec=spec, lam=lam, dtype=dtype))

  def place(self, variables):
    """The variables replicated on the mesh (no transfer for variables already there)."""
    return jax.device_put(variables, self._replicated)

  def dispatch(self, variables, images: np.ndarray, keys=('score', 'paper_score'), stop=None):
    """Dispatches every batch of `images`; returns their outputs, still on the devices.

    Args:
      variables: the scoring variables (see `__call__`).
      images: (N, isize, isize, nc) uint8 or float [-1, 1] images.
      keys: ('score', 'paper_score') or ('code',).
      stop: None, or a function called before each batch; True raises `Interrupted`.

    Returns:
      A list of {key: global array} per (padded) global batch; `join` them.
    """
    check_batch_shape(np.shape(images), self.spec.isize, self.spec.nc)
    variables, step = self.place(variables), self._steps[tuple(keys)]
    flight = placement.InFlight()
    for batch in eval_batches(
      images, self.global_batch_size, jax.process_index(), jax.process_count()
    ):
      _check(stop)
      flight.add(step(variables, shard_batch(batch, self.mesh)))
    return flight.outputs

  def join(self, parts: list, n: int, keys=('score', 'paper_score')) -> dict:
    """`dispatch`'s outputs as numpy arrays of n rows, on every process (one gather)."""
    if not parts:
      code = (self.spec.code_size,)
      return {k: np.zeros((0, *(code if k == 'code' else ())), np.float32) for k in keys}
    return placement.host_copy(self._join(parts, n))

  def __call__(self, variables, images: np.ndarray, keys=('score', 'paper_score'), stop=None):
    """Outputs `keys` of the scores for all `images`, in order, on every process.

    Args:
      variables: the scoring variables (a 'knn_bank' makes 'score' the latent k-NN one).
      images: (N, isize, isize, nc) uint8 or float [-1, 1] images.
      keys: ('score', 'paper_score') or ('code',).
      stop: None, or a function called before each batch; True raises `Interrupted`.

    Returns:
      dict of numpy arrays with len(images) rows.
    """
    return self.join(self.dispatch(variables, images, keys, stop), len(images), keys)

  def unit_codes(self, variables, images: np.ndarray, stop=None) -> jax.Array:
    """Unit-norm bottleneck codes of `images`, (N, code), replicated on the mesh.

    They never leave the devices (the k-NN bank). Raises `Interrupted` as `dispatch`.
    """
    parts = self.dispatch(variables, images, ('code',), stop)
    if not parts:
      return jax.device_put(np.zeros((0, self.spec.code_size), np.float32), self._replicated)
    return self._bank([p['code'] for p in parts], len(images))

  def reference_protocol(self, variables, images: np.ndarray, stop=None) -> np.ndarray:
    """The reference's test scores (paper score): train-mode BatchNorm, in-order batches of 64.

    Each batch is normalised with its own statistics (so a score depends on its batch
    neighbours); the last partial batch keeps its size, as the reference's loader does.
    Runs on this process's first device of the mesh (the variables are copied there
    once, unless already there); results are identical on every process.

    Args:
      variables: the scoring variables, on the devices or the host.
      images: (N, isize, isize, nc) uint8 images, in the reference's order.
      stop: None, or a function called before each batch; True raises `Interrupted`.

    Returns:
      (N,) numpy paper scores.
    """
    check_batch_shape(np.shape(images), self.spec.isize, self.spec.nc)
    device = self.mesh.local_devices[0]
    variables, flight = placement.on_one_device(variables, device), placement.InFlight()
    for start in range(0, len(images), REFERENCE_BATCH):
      _check(stop)
      chunk = jax.device_put(to_float(images[start : start + REFERENCE_BATCH]), device)
      flight.add(self._reference(variables, chunk))
    if not flight.outputs:
      return np.zeros((0,), np.float32)
    return np.concatenate(jax.device_get(flight.outputs))


def _join(parts: list, n: int) -> dict:
  """The batches' outputs concatenated, padding rows dropped."""
  return jax.tree.map(lambda *a: jnp.concatenate(a)[:n], *parts)


def _unit_codes(parts: list, n: int):
  return normalise_codes(jnp.concatenate(parts)[:n])


def _reference_scores(variables, images, spec, lam, dtype):
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
  """`scorer(variables, images, keys)`, checking `stop()` before each global batch.

  Args:
    scorer: the dataset scorer.
    variables: the scoring variables.
    images: the images to score.
    keys: the outputs wanted (see `DatasetScorer.__call__`).
    stop: None, or a function called before each batch (in every process alike); True
      raises `Interrupted`.

  Returns:
    dict of numpy arrays with len(images) rows.
  """
  return scorer(variables, images, keys, stop=stop)


def knn_bank(scorer: DatasetScorer, variables, train: np.ndarray, score: ScoreSpec, stop=None):
  """Unit-norm bottleneck codes of (up to score.knn_bank_size) training normals.

  Eval-mode BatchNorm, the model being evaluated; a seeded subset when the training set
  is larger than the cap. Validation and test images are never in the bank. The codes
  are computed, joined and normalised on the devices and stay there.

  Returns:
    (M, code) float32 jax.Array, replicated on the scorer's mesh.

  Raises:
    Interrupted: `stop()` returned True between batches.
  """
  cap = score.knn_bank_size
  if len(train) > cap:
    pick = np.random.default_rng([score.seed, 2]).choice(len(train), cap, replace=False)
    train = train[np.sort(pick)]
  return scorer.unit_codes(variables, train, stop)


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
  variables = scorer.place(variables)  # Once: no call below uploads the weights again.
  key = 'score' if score.kind == 'latent_knn' else 'paper_score'
  val_scores = score_dataset(scorer, variables, splits.val, stop=stop)[key]
  test, labels = score_dataset(scorer, variables, splits.test, stop=stop), splits.test_labels
  test_scores, report = test[key], {'paper_score_auroc': metrics.auroc(labels, test['paper_score'])}
  if 'knn_bank' in variables:  # 'score' is then the latent k-NN score.
    report['latent_knn_auroc'] = metrics.auroc(labels, test['score'])
  if localisation.needed(score.kind, splits):  # Map scores; pixel AUROC, PRO with masks.
    _check(stop)
    loc = localisation.evaluate(variables, splits, score.kind, localisation_spec)
    report.update(loc.report)
    if loc.test_scores is not None:  # A map score is the run's score.
      val_scores, test_scores = loc.val_scores, loc.test_scores
  if calibration is None:
    calibration = metrics.Calibration.fit(val_scores, score.threshold_percentile)
  report.update(metrics.evaluate(labels, test_scores, calibration))
  report.update(score_kind=score.kind, val_score=float(np.mean(val_scores)))
  if score.eval_protocol == 'reference':
    test_reference = scorer.reference_protocol(variables, splits.test, stop)
    report['reference_protocol_auroc'] = metrics.auroc(labels, test_reference)
  return report, calibration, test_scores
