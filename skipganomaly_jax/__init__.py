"""Skip-GANomaly in JAX/Flax: GAN-based image anomaly detection.

Public API:
  load(workdir): (params, config, calibration) of a trained run; params carry the run's
    score (kind, lambda, dtype, map settings: scoring/run_score.py), so
    calibration.is_anomalous(score_fn(params, images)) is the run's decision for every
    score kind (see deploy/trained_run.py).
  score_fn(params, images): anomaly scores, the run's own with load's params; score_maps:
    scores and per-pixel maps; score_details: every score, their terms, codes and maps
    (see scoring/scores.py).
  DatasetScorer: scores whole datasets data-parallel on a device mesh (scoring/evaluation.py).
  scoring_variables(g_state, d_state, knn_bank): `params` from training states.
  ModelSpec, Generator, Discriminator: the networks (nets/models.py).
"""

from skipganomaly_jax.nets.models import Discriminator, Generator, ModelSpec
from skipganomaly_jax.scoring.scores import score_details, score_fn, score_maps, scoring_variables


def load(workdir: str, which='latest'):
  """(params, config, calibration) of a trained run; see `skipganomaly_jax.deploy.trained_run.load`.

  params carry the run's `RunScore` under 'run_score' (its score kind, map kinds
  included, lambda, dtype, map settings and units), so `score_fn(params, images)` is the
  score the run was evaluated and calibrated with. Imported lazily: the data and
  checkpoint stack (tfds, orbax) is not needed to score.
  """
  from skipganomaly_jax.deploy import trained_run  # noqa: PLC0415

  return trained_run.load(workdir, which)


def __getattr__(name: str):
  """`DatasetScorer`, imported on first use (it needs the mesh and sharding helpers)."""
  if name == 'DatasetScorer':
    from skipganomaly_jax.scoring.evaluation import DatasetScorer  # noqa: PLC0415

    return DatasetScorer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
  'DatasetScorer',
  'Discriminator',
  'Generator',
  'ModelSpec',
  'load',
  'score_details',
  'score_fn',
  'score_maps',
  'scoring_variables',
]
