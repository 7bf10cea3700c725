"""Anomaly scores: `score_fn(params, images)`.

Two scores, both with BatchNorm in eval mode (running averages), so each image's score
is independent of the rest of the batch (the reference scores with batch statistics;
see docs/deviations.md):

- 'paper' (Skip-GANomaly's, the default): score(x) = lam * rec(x) + (1 - lam) * lat(x),
  lam = 0.9, rec(x) = mean over pixels and channels of (x - G(x))^2, lat(x) = mean over
  D's nz features of (f(x) - f(G(x)))^2.
- 'latent_knn' (an option): the cosine distance from G's bottleneck code of x to its
  k = 5 nearest codes of training normals ("knn_bank", stored with the checkpoint):
  1 - mean of the 5 largest cosine similarities. Why: on real MNIST digits the paper's
  score ranks by how much ink an image has more than by what it shows (the U-Net's skips
  let G copy anomalies too), and the same trained models rank better by latent k-NN
  (measured before BatchNorm parity, being rerun; docs/results.md).

A GANomaly model (config.model.name = 'ganomaly') is scored the same ways, with its own
paper score: 'paper' is GANomaly's, mean over its nz code of (latent_i - latent_o)^2,
the distance between encoder1's code of x and encoder2's code of G(x) (its authors'
test(); lam plays no part); 'latent_knn' compares encoder1's code (latent_i); 'rec',
the anomaly map and 'lat' (D's features of x and G(x)) are computed as for Skip-GANomaly
from its reconstruction and its D.

A run scored by its anomaly map (score_kind 'map_max' / 'map_topk') is scored from
localisation's smoothed map (scoring/localisation.py), in float32 as its evaluation does.

`params` is one pytree, `{'generator': {'params', 'batch_stats'}, 'discriminator':
{...}}` plus, for the latent k-NN score, `'knn_bank'`: (M, code) unit-norm codes, and
from `skipganomaly_jax.load`, `'run_score'`: the run's `run_score.RunScore` (its kind,
lam, dtype, map settings and map units). The architecture is read from the shapes. The
score is the run's map score when 'run_score' is a map kind, else latent k-NN exactly
when `params` hold a 'knn_bank' (a latent k-NN run's do), else the paper score; lam and
the dtype are the run's (0.9 and float32 without a 'run_score'; `lam=` overrides).
Scores are raw: calibration (min-max, threshold) comes from held-out normal images,
never the test set (see metrics.Calibration).

Public: `score_fn`, `score_maps` and `score_details` (arrays in memory), with
`scoring_variables` and `normalise_codes` to build `params`; `evaluation.DatasetScorer`
scores whole datasets on a device mesh with the same `score_terms`, the one place of
both formulas.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from skipganomaly_jax.config import DEFAULT_LAMBDA, KNN_K
from skipganomaly_jax.data.batches import eval_batches
from skipganomaly_jax.data.images import as_model_input
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring import run_score as run_score_lib

# DEFAULT_LAMBDA (lam of the paper score, 0.9 as in the paper) and KNN_K (the latent
# k-NN score's neighbours, fixed a priori, never tuned) are defined in config/fields.py, beside
# the config fields they bound; the score functions' defaults read them from there.
MAX_CHUNK = 256  # Images per compiled call; bounds memory and the number of compilations.


def scoring_variables(g_state, d_state, knn_bank=None) -> dict:
  """The `params` pytree of `score_fn` from the two TrainStates (and the k-NN bank)."""
  variables = {
    'generator': {'params': g_state.params, 'batch_stats': g_state.batch_stats},
    'discriminator': {'params': d_state.params, 'batch_stats': d_state.batch_stats},
  }
  if knn_bank is not None:
    variables['knn_bank'] = knn_bank
  return variables


def check_knn_bank(params, spec: ModelSpec) -> None:
  """Raises ValueError unless params' 'knn_bank' (if any) fits the generator's code
  (`spec.code_size`: 8 * ngf for Skip-GANomaly, nz for GANomaly)."""
  if 'knn_bank' not in params:
    return
  shape, code = tuple(np.shape(params['knn_bank'])), spec.code_size
  if len(shape) != 2 or shape[1] != code or shape[0] < KNN_K:
    raise ValueError(
      f"params['knn_bank'] must be (M >= {KNN_K}, {code}) unit-norm codes of training "
      f'normals (see train.build_knn_bank); got shape {shape}. Load params with '
      'skipganomaly_jax.load, or drop the key to use the paper score.'
    )


def normalise_codes(codes):
  """Rows scaled to unit L2 norm (cosine similarity becomes a dot product)."""
  codes = jnp.asarray(codes, jnp.float32)
  return codes / jnp.maximum(jnp.linalg.norm(codes, axis=-1, keepdims=True), 1e-12)


def knn_distance(codes, bank, k: int = KNN_K):
  """1 - mean cosine similarity of each code to its k most similar rows of `bank`.

  Args:
    codes: (N, C) codes of the images to score.
    bank: (M, C) unit-norm codes of training normals (see `normalise_codes`), M >= k.
    k: neighbours averaged.

  Returns:
    (N,) distances in [0, 2]; higher = farther from the training normals.
  """
  # 1 - cos(a, b) = |a - b|^2 / 2 for unit vectors. Computed naively (1 - a.b) in
  # float32 it loses its digits when codes are nearly parallel (1 - cos ~ 1e-6 in
  # barely trained models): so neighbours are ranked by |a - b|^2 expanded around the
  # bank's mean (the cancellation is then relative to the spread of the codes, not to
  # 1), and the distance comes from the differences themselves.
  codes = normalise_codes(codes)
  center = jnp.mean(bank, axis=0)
  a, b = codes - center, bank - center
  squared = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
  _, nearest = jax.lax.top_k(-squared, k)
  differences = codes[:, None, :] - bank[nearest]
  return 0.5 * jnp.mean(jnp.sum(jnp.square(differences), axis=-1), axis=-1)


def anomaly_map(images, reconstructions):
  """The per-pixel anomaly map: (x - G(x))^2 averaged over channels, shape (N, H, W).

  The one definition of the map: `score_maps` and `score_details` return it, and
  localisation's 'rec' map (pixel AUROC, PRO, the map scores) is it, smoothed. Its mean
  over pixels is the paper score's rec term.

  Args:
    images: (N, H, W, C) float images in [-1, 1].
    reconstructions: G's (N, H, W, C) reconstructions of them.
  """
  return jnp.mean(jnp.square(images - reconstructions), axis=-1)


def generator_outputs(spec: ModelSpec, variables, images, train: bool = False, dtype=jnp.float32):
  """G's reconstruction of images, its code of them, and (GANomaly) its code of that.

  Args:
    spec: the architecture (its name picks the generator).
    variables: G's {'params', 'batch_stats'}.
    images: float32 [-1, 1] batch.
    train: BatchNorm with batch statistics (the running statistics are not updated).
    dtype: compute dtype.

  Returns:
    (reconstruction, code, code_of_reconstruction): Skip-GANomaly's code is the U-Net's
    bottleneck (N, 8 * ngf) and it has no third output (None); GANomaly's are encoder1's
    code of x and encoder2's code of G(x), (N, nz) each.
  """
  kwargs = {} if spec.name == 'ganomaly' else {'return_code': True}
  model = spec.generator(dtype=dtype)
  if train:
    out = model.apply(variables, images, train=True, mutable=['batch_stats'], **kwargs)[0]
  else:
    out = model.apply(variables, images, train=False, **kwargs)
  return out if spec.name == 'ganomaly' else (*out, None)


def score_terms(
  params,
  images,
  lam,
  spec: ModelSpec,
  return_maps: bool = False,
  train: bool = False,
  dtype=jnp.float32,
) -> dict:
  """Scores, rec/lat terms and (optionally) reconstructions and maps of one batch.

  Args:
    params: scoring variables (see module doc).
    images: float32 [-1, 1] batch (already checked).
    lam: weight of the reconstruction term (Skip-GANomaly's paper score only).
    spec: the architecture (its name picks the model and its paper score).
    return_maps: also return 'reconstruction' and 'anomaly_map'.
    train: BatchNorm with batch statistics (the reference's test-time behaviour, used
      only by its protocol; the running statistics are not updated).
    dtype: compute dtype.

  Returns:
    dict with 'score' (the run's map score for a map-kind 'run_score', else latent
    k-NN when params hold a 'knn_bank', else the paper's), 'paper_score' (the model's
    own: see the module doc), 'rec', 'lat' (N,), 'code' (N, spec.code_size), for a
    map-kind 'run_score' 'map_max' and 'map_topk' (N,), and the maps on request.
  """

  def apply(model, variables, x, **kwargs):
    if not train:
      return model.apply(variables, x, train=False, **kwargs)
    return model.apply(variables, x, train=True, mutable=['batch_stats'], **kwargs)[0]

  x_hat, code, code_of_x_hat = generator_outputs(spec, params['generator'], images, train, dtype)
  d_model = spec.discriminator(dtype=dtype)
  _, f_real = apply(d_model, params['discriminator'], images)
  _, f_fake = apply(d_model, params['discriminator'], x_hat)
  rec = jnp.mean(jnp.square(images - x_hat), axis=(1, 2, 3))
  lat = jnp.mean(jnp.square(f_real - f_fake), axis=1)
  if spec.name == 'ganomaly':  # GANomaly's paper score (its authors' test()): no lambda.
    paper = jnp.mean(jnp.square(code - code_of_x_hat), axis=1)
  else:
    paper = lam * rec + (1.0 - lam) * lat  # The paper score: its one definition.
  score = knn_distance(code, params['knn_bank']) if 'knn_bank' in params else paper
  out = {'score': score, 'paper_score': paper, 'rec': rec, 'lat': lat, 'code': code}
  run = run_score_lib.of(params)
  if run is not None and run.is_map:  # The run's score comes from its anomaly map.
    float32_x_hat = x_hat if jnp.dtype(dtype) == jnp.float32 and not train else None
    out.update(run_score_lib.map_scores(params, images, spec, run, float32_x_hat))
    out['score'] = out[run.kind]
  if return_maps:
    out['reconstruction'] = x_hat
    out['anomaly_map'] = anomaly_map(images, x_hat)
  return out


_score_batch = jax.jit(score_terms, static_argnames=('spec', 'return_maps', 'train', 'dtype'))


def _bucket(n: int, chunk: int) -> int:
  """Images per compiled call for n images: the next power of two, at most `chunk`.

  Any n then compiles one of at most log2(chunk) + 1 programs (padding is free of
  side effects: eval-mode BatchNorm scores every image independently of its batch).
  """
  return min(chunk, 1 << max(n - 1, 0).bit_length())


def _check_static_flag(return_maps) -> None:
  """Raises TypeError unless return_maps is a Python bool (not a traced value)."""
  if not isinstance(return_maps, bool | np.bool_):
    raise TypeError(
      f'return_maps must be a Python bool; got {type(return_maps).__name__}. Under '
      'jax.jit it is traced: jit `score_maps` instead, or use '
      "jax.jit(score_fn, static_argnames='return_maps')."
    )


def _empty_result(params, spec: ModelSpec, lam, return_maps: bool, dtype) -> dict:
  """What `score_terms` returns for zero images: arrays with 0 rows."""
  image = jax.ShapeDtypeStruct((1, spec.isize, spec.isize, spec.nc), jnp.float32)
  shapes = jax.eval_shape(
    functools.partial(score_terms, spec=spec, return_maps=return_maps, dtype=dtype),
    params,
    image,
    lam,
  )
  return {k: jnp.zeros((0, *v.shape[1:]), v.dtype) for k, v in shapes.items()}


def run_options(params, lam=None):
  """(lam, compute dtype) to score params with: the run's ('run_score'), else lam = 0.9 in
  float32; an explicit `lam` overrides the run's."""
  run = run_score_lib.of(params)
  if lam is None:
    lam = run.lam if run is not None else DEFAULT_LAMBDA
  return lam, (run.compute_dtype if run is not None else jnp.dtype(jnp.float32))


def check_params(params) -> ModelSpec:
  """The architecture of params, after checking their 'knn_bank' and 'run_score'.

  Raises:
    ValueError: a bank of the wrong shape, or a 'run_score' of other networks.
    TypeError: a 'run_score' that is not a `RunScore`.
  """
  spec = ModelSpec.from_variables(params)
  check_knn_bank(params, spec)
  run = run_score_lib.of(params)
  if run is not None:
    run_score_lib.check(run, spec)
  return spec


def score_details(
  params,
  images,
  *,
  lam: float | None = None,
  return_maps: bool = False,
  value_range='auto',
  chunk: int = MAX_CHUNK,
) -> dict:
  """Scores with their terms, and on request reconstructions and anomaly maps.

  Args:
    params: {'generator': {...}, 'discriminator': {...}} variables, with the 'knn_bank'
      and 'run_score' of `skipganomaly_jax.load` if any (see module doc).
    images: (N, isize, isize, nc) NHWC, any N >= 0; see `score_fn` for the value range.
    lam: weight of the reconstruction term of the paper score; None: the run's
      (params['run_score'].lam), else 0.9.
    return_maps: also return 'reconstruction' (N, H, W, C) and 'anomaly_map' (N, H, W),
      the per-pixel squared error (x - G(x))^2 averaged over channels (`anomaly_map`).
      A Python bool.
    value_range: 'auto' or (low, high); see `score_fn`.
    chunk: most images per compiled call. Batches are padded to a power of two (at most
      `chunk`), so any N compiles at most log2(chunk) + 1 programs. Under jax.jit the
      batch is scored in one piece.

  Returns:
    dict of arrays: 'score' (the run's score: see `score_fn`), 'paper_score', 'rec',
    'lat' of shape (N,), 'code' (N, code), 'map_max' and 'map_topk' (N,) when the run's
    score is a map score, plus the maps on request.

  Raises:
    ValueError: as `score_fn`.
  """
  _check_static_flag(return_maps)
  spec = check_params(params)
  lam, dtype = run_options(params, lam)
  x = as_model_input(images, spec.isize, spec.nc, value_range)
  n = x.shape[0]
  if n == 0:
    return _empty_result(params, spec, lam, return_maps, dtype)
  if isinstance(x, jax.core.Tracer):  # Inside the caller's jit: one program, no padding.
    return score_terms(params, x, lam, spec, return_maps, dtype=dtype)
  parts = [
    _score_batch(params, batch, lam, spec, return_maps, dtype=dtype)
    for batch in eval_batches(x, _bucket(n, chunk))
  ]
  return jax.tree.map(lambda *a: jnp.concatenate(a)[:n], *parts)


def score_fn(
  params, images, *, lam: float | None = None, return_maps: bool = False, value_range='auto'
):
  """Anomaly scores of a batch of images (higher = more anomalous): the run's own score.

  With params from `skipganomaly_jax.load(workdir)` this is the score the run was
  evaluated and calibrated with (params['run_score']: its kind, lam, dtype, map
  settings and map units), so `calibration.is_anomalous(score_fn(params, images))` is
  the run's decision for every score kind. With bare params (`scoring_variables`): the
  paper score (lam = 0.9, float32), or latent k-NN when they hold a 'knn_bank'.

  Value range: the networks take float images in [-1, 1]. With value_range='auto'
  (default), uint8 images are read as [0, 255] and float images must already be in
  [-1, 1]; a float batch without a single negative value is rejected, because that is
  what images scaled to [0, 1] (the common mistake, scored silently wrong otherwise)
  look like. State the range to pass such a batch: value_range=(0, 1) rescales [0, 1]
  images, value_range=(-1, 1) accepts [-1, 1] images that happen to be non-negative;
  any (low, high) is mapped linearly to [-1, 1].

  Under jax.jit: the shape, dtype, 'knn_bank' and 'run_score' checks hold (shapes and
  the RunScore are static); the value checks (NaN/Inf, the range, the [0, 1] guard)
  need concrete values and are skipped, so traced float images are taken to be in
  [-1, 1] (or in value_range). `return_maps` must be static: jit `score_maps` for maps,
  or use jax.jit(score_fn, static_argnames='return_maps').

  Args:
    params: {'generator': {'params', 'batch_stats'}, 'discriminator': {...}}, with the
      'knn_bank' of a latent k-NN run and the 'run_score' of a loaded run; as returned
      by `skipganomaly_jax.load(workdir)` or `scoring_variables`.
    images: (N, isize, isize, nc) NHWC, uint8 or float (see above); any N >= 0 (an
      empty batch gives empty results).
    lam: weight of the reconstruction term of the paper score; None (default): the
      run's score_lambda, 0.9 (the paper's) for bare params. A value overrides the run's.
    return_maps: if True, also return per-pixel anomaly maps (N, isize, isize): the
      squared error (x - G(x))^2 averaged over channels (see `score_maps`).
    value_range: 'auto' or the (low, high) range of the images' values (see above).

  Returns:
    scores of shape (N,), or (scores, maps) when return_maps is True.

  Raises:
    ValueError: images of the wrong rank, size, channel count (a channel-first batch is
      named as such) or dtype, non-finite, outside their range, or all-non-negative
      floats under value_range='auto'; a 'knn_bank' of the wrong shape; a 'run_score'
      of other networks.
    TypeError: a traced `return_maps`; a 'run_score' that is not a `RunScore`.
  """
  out = score_details(params, images, lam=lam, return_maps=return_maps, value_range=value_range)
  return (out['score'], out['anomaly_map']) if return_maps else out['score']


def score_maps(params, images, *, lam: float | None = None, value_range='auto'):
  """(scores (N,), anomaly maps (N, isize, isize)): `score_fn` with maps, jittable as is.

  The map of an image is its per-pixel squared reconstruction error, (x - G(x))^2
  averaged over channels, on the [-1, 1] scale and unsmoothed (`anomaly_map`): the same
  map as localisation's 'rec' map, whose pixel AUROC, PRO and map scores a run reports
  (those smooth it with config.localisation.sigma). No lambda enters it. The scores are
  `score_fn`'s (the run's own).

  Arguments, checks and behaviour under jax.jit as `score_fn`.
  """
  out = score_details(params, images, lam=lam, return_maps=True, value_range=value_range)
  return out['score'], out['anomaly_map']
