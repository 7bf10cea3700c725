"""Skip-GANomaly in JAX/Flax: GAN-based image anomaly detection.

Public API:
  load(workdir): (params, config, calibration) of a trained run (see api.py).
  score_fn(params, images): anomaly scores (see scoring.py).
  ModelSpec, Generator, Discriminator: the networks (models.py).
"""

from skipganomaly_jax.models import Discriminator, Generator, ModelSpec
from skipganomaly_jax.scoring import score_details, score_fn, scoring_variables


def load(workdir: str, which='latest'):
  """(params, config, calibration) of a trained run; see `skipganomaly_jax.api.load`.

  Imported lazily: the data and checkpoint stack (tfds, orbax) is not needed to score.
  """
  from skipganomaly_jax import api  # noqa: PLC0415

  return api.load(workdir, which)


__all__ = [
  'Discriminator',
  'Generator',
  'ModelSpec',
  'load',
  'score_details',
  'score_fn',
  'scoring_variables',
]
