"""score_fn against a numpy recomputation from the models' outputs; bad inputs."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import skipganomaly_jax
from skipganomaly_jax import config as config_lib
from skipganomaly_jax import score_details, score_fn, score_maps
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring import evaluation, scores
from skipganomaly_jax.scoring.scores import knn_distance, normalise_codes, scoring_variables
from skipganomaly_jax.training import training_step


@functools.cache
def tiny_variables(model: str = 'skipganomaly'):
  """Scoring variables of a freshly initialised tiny `model` (32x32x1)."""
  import conftest  # noqa: PLC0415

  config = conftest.tiny(conftest.load_config('default'))
  config.nc, config.model.name = 1, model
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  g, d = training_step.create_train_states(spec, jax.random.key(0))
  # Non-trivial running statistics, as after training.
  g = g.replace(batch_stats=jax.tree.map(lambda v: v + 0.2, g.batch_stats))
  d = d.replace(batch_stats=jax.tree.map(lambda v: v + 0.3, d.batch_stats))
  return scoring_variables(g, d)


@pytest.fixture(scope='module')
def params():
  return tiny_variables()


def numpy_scores(params, images, lam=0.9, train=False):
  """(paper scores, maps) in float64 from the networks' outputs (BatchNorm as `train`).

  The paper score of each model as its paper defines it: Skip-GANomaly's
  lam * rec + (1 - lam) * lat (reconstruction and D-feature errors), GANomaly's
  mean over the code of (z - z')^2 (encoder1's code of x, encoder2's of G(x))."""
  spec = ModelSpec.from_variables(params)
  apply = lambda model, v, x: model.apply(v, x, train=train, mutable=['batch_stats'])[0]
  out = apply(spec.generator(), params['generator'], images)
  as64 = lambda a: np.asarray(a, np.float64)
  x_hat = as64(out[0] if spec.name == 'ganomaly' else out)
  _, f_real = apply(spec.discriminator(), params['discriminator'], images)
  _, f_fake = apply(spec.discriminator(), params['discriminator'], x_hat.astype(np.float32))
  x = as64(images)
  rec = ((x - x_hat) ** 2).mean(axis=(1, 2, 3))
  lat = ((as64(f_real) - as64(f_fake)) ** 2).mean(axis=1)
  if spec.name == 'ganomaly':
    paper = ((as64(out[1]) - as64(out[2])) ** 2).mean(axis=1)
  else:
    paper = lam * rec + (1 - lam) * lat
  return paper, ((x - x_hat) ** 2).mean(axis=-1)


def test_scores_and_maps_match_numpy(params, rng):
  images = rng.uniform(-1, 1, (5, 32, 32, 1)).astype(np.float32)
  scores, maps = score_fn(params, images, return_maps=True)
  expected_scores, expected_maps = numpy_scores(params, images)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)
  np.testing.assert_allclose(maps, expected_maps, atol=1e-5)
  np.testing.assert_allclose(
    score_fn(params, images, lam=0.3), numpy_scores(params, images, lam=0.3)[0], rtol=1e-4
  )


def test_chunked_scores_equal_one_batch_and_any_batch_size(params, rng):
  images = rng.uniform(-1, 1, (11, 32, 32, 1)).astype(np.float32)
  whole = score_details(params, images)['score']
  chunked = score_details(params, images, chunk=4)['score']
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  np.testing.assert_allclose(score_fn(params, images[:1]), whole[:1], rtol=1e-5)


def test_uint8_is_scaled(params, rng):
  raw = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
  np.testing.assert_allclose(
    score_fn(params, raw), score_fn(params, raw.astype(np.float32) / 127.5 - 1), rtol=1e-5
  )


def test_score_fn_is_jittable(params, rng):
  images = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(score_fn)(params, images), score_fn(params, images), rtol=1e-5)


def test_maps_under_jit(params, rng):
  images = rng.uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
  scores, maps = score_fn(params, images, return_maps=True)
  for jitted in (
    jax.jit(score_maps),
    lambda p, x: jax.jit(score_fn, static_argnames='return_maps')(p, x, return_maps=True),
  ):
    got_scores, got_maps = jitted(params, images)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-5)
    np.testing.assert_allclose(got_maps, maps, rtol=1e-5, atol=1e-6)
  with pytest.raises(TypeError, match='jit `score_maps` instead'):
    jax.jit(score_fn)(params, images, return_maps=True)


def test_checks_that_hold_under_jit(params):
  # Shapes are static: checked under jit too.
  with pytest.raises(ValueError, match='32x32 pixels'):
    jax.jit(score_fn)(params, np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(ValueError, match='NCHW'):
    jax.jit(score_fn)(params, np.zeros((2, 1, 32, 32), np.float32))
  # Values are not (as documented): NaN images give NaN scores instead of an error.
  images = np.full((2, 32, 32, 1), -0.5, np.float32)
  images[1, 3, 3, 0] = np.nan
  scores = np.asarray(jax.jit(score_fn)(params, images))
  assert np.isfinite(scores[0]) and np.isnan(scores[1])


def test_empty_batch_gives_empty_results(params):
  for images in (np.zeros((0, 32, 32, 1), np.uint8), np.zeros((0, 32, 32, 1), np.float32)):
    assert np.shape(score_fn(params, images)) == (0,)
    scores, maps = score_fn(params, images, return_maps=True)
    assert np.shape(scores) == (0,) and np.shape(maps) == (0, 32, 32)
  details = score_details(params, np.zeros((0, 32, 32, 1), np.uint8), return_maps=True)
  shapes = {k: np.shape(v) for k, v in details.items()}
  code = 8 * ModelSpec.from_variables(params).ngf
  assert shapes == {
    'score': (0,),
    'paper_score': (0,),
    'rec': (0,),
    'lat': (0,),
    'code': (0, code),
    'reconstruction': (0, 32, 32, 1),
    'anomaly_map': (0, 32, 32),
  }


def test_float_images_in_0_1_are_caught(params, rng):
  """The common mistake: floats scaled to [0, 1]. Rejected unless the range is stated."""
  raw = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
  unit = raw.astype(np.float32) / 255.0  # [0, 1]
  with pytest.raises(ValueError, match=r'look scaled to \[0, 1\].*value_range=\(0, 1\)'):
    score_fn(params, unit)
  want = score_fn(params, raw)
  np.testing.assert_allclose(score_fn(params, unit, value_range=(0, 1)), want, rtol=1e-5)
  np.testing.assert_allclose(score_fn(params, 255.0 * unit, value_range=(0, 255)), want, rtol=1e-5)
  # Valid [-1, 1] data that happens to be non-negative passes once its range is stated,
  # and scores as the same values would with one negative pixel elsewhere in the batch.
  bright = rng.uniform(0.2, 1.0, (2, 32, 32, 1)).astype(np.float32)
  stated = score_fn(params, bright, value_range=(-1, 1))
  with_dark = np.concatenate([bright, np.full((1, 32, 32, 1), -1.0, np.float32)])
  np.testing.assert_allclose(stated, score_fn(params, with_dark)[:2], rtol=1e-5)
  with pytest.raises(ValueError, match=r'value_range=\(0, 1\); got values in'):
    score_fn(params, unit * 2, value_range=(0, 1))
  with pytest.raises(ValueError, match='low < high'):
    score_fn(params, unit, value_range=(1, 0))
  with pytest.raises(ValueError, match="'auto' or"):
    score_fn(params, unit, value_range='[0, 1]')


@pytest.mark.parametrize(
  'shape,match',
  [
    ((32, 32, 1), 'rank 4'),
    ((2, 28, 28, 1), '32x32 pixels'),
    ((2, 32, 32, 3), '1 channel'),
    ((2, 1, 32, 32), r'NCHW.*expected NHWC.*x\.transpose\(0, 2, 3, 1\)'),
    ((2, 3, 32, 32), r'NCHW.*x\.transpose\(0, 2, 3, 1\)'),
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


def test_knn_distance_matches_numpy(rng):
  codes, bank = rng.normal(size=(9, 16)), rng.normal(size=(40, 16))
  got = knn_distance(codes.astype(np.float32), normalise_codes(bank.astype(np.float32)), k=5)
  np.testing.assert_allclose(got, numpy_knn(codes, bank), atol=1e-5)


def test_latent_knn_score_uses_the_bank(params, rng):
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


def test_knn_distance_is_precise_for_near_identical_codes(rng):
  # Codes within ~1e-3 of each other (1 - cos ~ 1e-6): computed as 1 - cos in float32
  # it would be off by ~6%; the distance must keep float32's relative precision.
  base = rng.normal(size=(1, 64))
  codes = base + 1e-3 * rng.normal(size=(6, 64))
  bank = base + 1e-3 * rng.normal(size=(50, 64))
  got = knn_distance(codes.astype(np.float32), normalise_codes(bank.astype(np.float32)), k=5)
  np.testing.assert_allclose(got, numpy_knn(codes, bank), rtol=2e-3)


def test_batch_sizes_compile_a_bounded_number_of_programs(params, rng):
  """Batches are padded to powers of two (at most `chunk`): 6 sizes, 2 programs."""
  images = rng.uniform(-1, 1, (13, 32, 32, 1)).astype(np.float32)
  whole = np.asarray(score_details(params, images)['score'])
  scores._score_batch.clear_cache()
  for n in (3, 5, 6, 7, 9, 13):  # Buckets 4, 8, 8, 8, then chunks of 8.
    got = score_details(params, images[:n], chunk=8)['score']
    np.testing.assert_allclose(got, whole[:n], rtol=1e-5)
  assert scores._score_batch._cache_size() == 2


@pytest.mark.parametrize('model', ['skipganomaly', 'ganomaly'])
def test_dataset_scorer_and_the_reference_protocol(model, rng):
  params = tiny_variables(model)
  spec = ModelSpec.from_variables(params)
  assert spec.name == model
  mesh = Mesh(np.asarray(jax.devices()), (evaluation.AXIS,))
  scorer = skipganomaly_jax.DatasetScorer(spec, mesh, 4 * mesh.size, 0.9)
  images = rng.integers(0, 256, (6 * mesh.size, 32, 32, 1), dtype=np.uint8)  # Padded.
  got = scorer(params, images)
  want = score_details(params, images)
  for key in ('score', 'paper_score'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
  np.testing.assert_allclose(
    scorer(params, images, keys=('code',))['code'], want['code'], atol=1e-6
  )
  empty = scorer(params, images[:0], keys=('code',))['code']
  # Skip-GANomaly's code: the U-Net bottleneck; GANomaly's: encoder1's nz code.
  assert empty.shape == (0, {'skipganomaly': 8 * spec.ngf, 'ganomaly': spec.nz}[model])
  # The reference's protocol: train-mode BatchNorm over in-order batches of 64 (+ the rest),
  # the model's own paper score (GANomaly: measured 7e-7 from the float64 recomputation;
  # with eval-mode BatchNorm it would be off by a factor ~1000, and one batch of 66 by 14%).
  images = rng.integers(0, 256, (66, 32, 32, 1), dtype=np.uint8)
  x = images.astype(np.float32) / 127.5 - 1.0
  expected = np.concatenate(
    [numpy_scores(params, x[:64], train=True)[0], numpy_scores(params, x[64:], train=True)[0]]
  )
  np.testing.assert_allclose(scorer.reference_protocol(params, images), expected, rtol=1e-4)
  with pytest.raises(ValueError, match='NCHW'):
    scorer(params, images.transpose(0, 3, 1, 2))
