"""Skip-GANomaly in JAX/Flax: GAN-based image anomaly detection.

Public API:
  score_fn(params, images): anomaly scores (see scoring.py).
  ModelSpec, Generator, Discriminator: the networks (models.py).
"""

from skipganomaly_jax.models import Discriminator, Generator, ModelSpec
from skipganomaly_jax.scoring import score_details, score_fn, scoring_variables

__all__ = [
  'Discriminator',
  'Generator',
  'ModelSpec',
  'score_details',
  'score_fn',
  'scoring_variables',
]
