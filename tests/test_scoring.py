"""score_fn against a numpy recomputation from the models' outputs; bad inputs."""

import jax
import numpy as np
import pytest

from skipganomaly_jax import score_fn, training_step
from skipganomaly_jax.models import ModelSpec
from skipganomaly_jax.scoring import (
  knn_distance,
  normalise_codes,
  score_details,
  scoring_variables,
)


@pytest.fixture(scope='module')
def params():
  import conftest  # noqa: PLC0415

  config = conftest.tiny(conftest.load_config('default'))
  config.nc = 1
  g, d = training_step.create_train_states(config, jax.random.key(0))
  # Non-trivial running statistics, as after training.
  d = d.replace(batch_stats=jax.tree.map(lambda v: v + 0.3, d.batch_stats))
  return scoring_variables(g, d)


def numpy_scores(params, images, lam=0.9):
  spec = ModelSpec.from_variables(params)
  x_hat = np.asarray(spec.generator().apply(params['generator'], images, train=False), np.float64)
  _, f_real = spec.discriminator().apply(params['discriminator'], images, train=False)
  _, f_fake = spec.discriminator().apply(
    params['discriminator'], x_hat.astype(np.float32), train=False
  )
  x = np.asarray(images, np.float64)
  rec = ((x - x_hat) ** 2).mean(axis=(1, 2, 3))
  lat = ((np.asarray(f_real, np.float64) - np.asarray(f_fake, np.float64)) ** 2).mean(axis=1)
  return lam * rec + (1 - lam) * lat, np.abs(x - x_hat).mean(axis=-1)


def test_scores_and_maps_match_numpy(params):
  images = np.random.default_rng().uniform(-1, 1, (5, 32, 32, 1)).astype(np.float32)
  scores, maps = score_fn(params, images, return_maps=True)
  expected_scores, expected_maps = numpy_scores(params, images)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)
  np.testing.assert_allclose(maps, expected_maps, atol=1e-5)
  np.testing.assert_allclose(
    score_fn(params, images, lam=0.3), numpy_scores(params, images, lam=0.3)[0], rtol=1e-4
  )


def test_chunked_scores_equal_one_batch_and_any_batch_size(params):
  images = np.random.default_rng().uniform(-1, 1, (11, 32, 32, 1)).astype(np.float32)
  whole = score_details(params, images)['score']
  chunked = score_details(params, images, chunk=4)['score']
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  np.testing.assert_allclose(score_fn(params, images[:1]), whole[:1], rtol=1e-5)


def test_uint8_is_scaled(params):
  raw = np.random.default_rng().integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
  np.testing.assert_allclose(
    score_fn(params, raw), score_fn(params, raw.astype(np.float32) / 127.5 - 1), rtol=1e-5
  )


def test_score_fn_is_jittable(params):
  images = np.random.default_rng().uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(score_fn)(params, images), score_fn(params, images), rtol=1e-5)


@pytest.mark.parametrize(
  'shape,match',
  [
    ((32, 32, 1), 'rank 4'),
    ((2, 28, 28, 1), '32x32 pixels'),
    ((2, 32, 32, 3), '1 channel'),
  ],
)
def test_bad_shapes(params, shape, match):
  with pytest.raises(ValueError, match=match):
    score_fn(params, np.zeros(shape, np.float32))


def test_non_finite_and_range(params):
  images = np.zeros((3, 32, 32, 1), np.float32)
  images[1, 4, 4, 0] = np.nan
  with pytest.raises(ValueError, match=r'NaN or Inf.*\[1\]'):
    score_fn(params, images)
  with pytest.raises(ValueError, match=r'scaled to \[-1, 1\]'):
    score_fn(params, np.full((1, 32, 32, 1), 255.0, np.float32))
  with pytest.raises(ValueError, match='uint8'):
    score_fn(params, np.zeros((1, 32, 32, 1), np.int32))


def numpy_knn(codes, bank_codes, k=5):
  """Brute-force cosine k-NN distance in float64."""
  a = np.asarray(codes, np.float64)
  b = np.asarray(bank_codes, np.float64)
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  sims = np.sort(a @ b.T, axis=1)[:, ::-1][:, :k]
  return 1.0 - sims.mean(axis=1)


def test_knn_distance_matches_numpy():
  rng = np.random.default_rng()
  codes, bank = rng.normal(size=(9, 16)), rng.normal(size=(40, 16))
  got = knn_distance(codes.astype(np.float32), normalise_codes(bank.astype(np.float32)), k=5)
  np.testing.assert_allclose(got, numpy_knn(codes, bank), atol=1e-5)


def test_latent_knn_score_uses_the_bank(params):
  rng = np.random.default_rng()
  train = rng.uniform(-1, 1, (30, 32, 32, 1)).astype(np.float32)
  images = rng.uniform(-1, 1, (7, 32, 32, 1)).astype(np.float32)
  # The codes are G's innermost encoder output, read here through Flax's intermediates.
  spec = ModelSpec.from_variables(params)
  _, inter = spec.generator().apply(
    params['generator'],
    np.concatenate([train, images]),
    train=False,
    capture_intermediates=True,
    mutable=['intermediates'],
  )
  innermost = f'down_{int(np.log2(spec.isize)) - 1}'
  codes = np.asarray(inter['intermediates'][innermost]['__call__'][0]).reshape(37, -1)
  with_bank = {**params, 'knn_bank': normalise_codes(codes[:30])}
  details = score_details(with_bank, images)
  np.testing.assert_allclose(details['score'], numpy_knn(codes[30:], codes[:30]), atol=1e-5)
  # The paper score stays available, and without a bank it is the score.
  np.testing.assert_allclose(details['paper_score'], numpy_scores(params, images)[0], rtol=1e-4)
  np.testing.assert_allclose(score_fn(params, images), details['paper_score'], rtol=1e-5)


def test_bad_knn_bank_is_rejected(params):
  images = np.zeros((2, 32, 32, 1), np.float32)
  for bank in (np.zeros((3, 32), np.float32), np.zeros((10, 7), np.float32)):
    with pytest.raises(ValueError, match="knn_bank'\\] must be"):
      score_fn({**params, 'knn_bank': bank}, images)


def test_knn_distance_is_precise_for_near_identical_codes():
  # Codes within ~1e-3 of each other (1 - cos ~ 1e-6): computed as 1 - cos in float32
  # it would be off by ~6%; the distance must keep float32's relative precision.
  rng = np.random.default_rng()
  base = rng.normal(size=(1, 64))
  codes = base + 1e-3 * rng.normal(size=(6, 64))
  bank = base + 1e-3 * rng.normal(size=(50, 64))
  got = knn_distance(codes.astype(np.float32), normalise_codes(bank.astype(np.float32)), k=5)
  np.testing.assert_allclose(got, numpy_knn(codes, bank), rtol=2e-3)
