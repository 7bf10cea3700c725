"""Anomaly scores: `score_fn(params, images)`.

Two scores, both with BatchNorm in eval mode (running averages), so each image's score
is independent of the rest of the batch (the reference scores with batch statistics;
see SPEC.md):

- 'paper' (Skip-GANomaly's, the default): score(x) = lam * rec(x) + (1 - lam) * lat(x),
  lam = 0.9, rec(x) = mean over pixels and channels of (x - G(x))^2, lat(x) = mean over
  D's nz features of (f(x) - f(G(x)))^2.
- 'latent_knn' (an option): the cosine distance from G's bottleneck code of x to its
  k = 5 nearest codes of training normals ("knn_bank", stored with the checkpoint):
  1 - mean of the 5 largest cosine similarities. Why: on real MNIST digits the paper's
  score ranks by how much ink an image has more than by what it shows (the U-Net's skips
  let G copy anomalies too), mean AUROC 0.61 over 10 digits; the same trained models
  ranked by latent k-NN reach 0.88 (benchmarks/results/quality.md; a k-NN on raw pixels
  reaches 0.91 there: on small digits the networks add nothing over pixels).

`params` is one pytree, `{'generator': {'params', 'batch_stats'}, 'discriminator':
{...}}` plus, for the latent k-NN score, `'knn_bank'`: (M, code) unit-norm codes. The
structure `skipganomaly_jax.load` returns; the architecture is read from its shapes, and
the score is 'latent_knn' exactly when `params` holds a 'knn_bank'. Scores are raw:
calibration (min-max, threshold) comes from held-out normal images, never the test set
(see metrics.Calibration).
"""

import jax
import jax.numpy as jnp
import numpy as np

from skipganomaly_jax.models import ModelSpec

DEFAULT_LAMBDA = 0.9
KNN_K = 5  # Neighbours averaged by the latent k-NN score; fixed a priori, never tuned.
SCORE_KINDS = ('latent_knn', 'paper')
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
  """Raises ValueError unless params' 'knn_bank' (if any) fits the generator's code."""
  if 'knn_bank' not in params:
    return
  shape, code = tuple(np.shape(params['knn_bank'])), 8 * spec.ngf
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


def check_images(images, spec: ModelSpec):
  """Validates a batch on the host and returns it as float32 in [-1, 1].

  Shape checks always run; value checks (finite, range) run only on concrete arrays, so
  that `score_fn` stays jittable.

  Raises:
    ValueError: wrong rank, size or channel count, non-finite values, or float values
      outside [-1, 1].
  """
  expected = f'(N, {spec.isize}, {spec.isize}, {spec.nc})'
  shape = tuple(np.shape(images))
  if len(shape) != 4:
    raise ValueError(
      f'images must be a batch of rank 4 {expected} (NHWC); got shape '
      f'{shape}. Add a batch axis with images[None] for a single image.'
    )
  if shape[1:3] != (spec.isize, spec.isize):
    raise ValueError(
      f'images must be {spec.isize}x{spec.isize} pixels, shape {expected}; '
      f'got {shape[1]}x{shape[2]} (shape {shape}). Resize them first.'
    )
  if shape[3] != spec.nc:
    raise ValueError(
      f'images must have {spec.nc} channel(s), shape {expected}; got {shape[3]} (shape {shape}).'
    )
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f'images must be uint8 in [0, 255] or float in [-1, 1]; got {dtype}.')
  if isinstance(images, jax.core.Tracer):
    return images.astype(jnp.float32)
  host = np.asarray(images)
  if not np.all(np.isfinite(host)):
    bad = np.unique(np.argwhere(~np.isfinite(host))[:, 0])
    raise ValueError(f'images contain NaN or Inf values (images {bad[:10].tolist()}).')
  lo, hi = float(host.min(initial=0.0)), float(host.max(initial=0.0))
  if lo < -1.001 or hi > 1.001:
    raise ValueError(
      f'float images must be scaled to [-1, 1]; got values in [{lo:.3g}, '
      f'{hi:.3g}]. Pass uint8 images in [0, 255] or scale with x/127.5 - 1.'
    )
  return jnp.asarray(host, jnp.float32)


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
    lam: weight of the reconstruction term.
    spec: the architecture.
    return_maps: also return 'reconstruction' and 'anomaly_map'.
    train: BatchNorm with batch statistics (the reference's test-time behaviour, used
      only by its protocol; the running statistics are not updated).
    dtype: compute dtype.

  Returns:
    dict with 'score' (latent k-NN when params hold a 'knn_bank', else the paper's),
    'paper_score', 'rec', 'lat' (N,), 'code' (N, code), and the maps on request.
  """

  def apply(model, variables, x, **kwargs):
    if not train:
      return model.apply(variables, x, train=False, **kwargs)
    return model.apply(variables, x, train=True, mutable=['batch_stats'], **kwargs)[0]

  x_hat, code = apply(spec.generator(dtype=dtype), params['generator'], images, return_code=True)
  d_model = spec.discriminator(dtype=dtype)
  _, f_real = apply(d_model, params['discriminator'], images)
  _, f_fake = apply(d_model, params['discriminator'], x_hat)
  rec = jnp.mean(jnp.square(images - x_hat), axis=(1, 2, 3))
  lat = jnp.mean(jnp.square(f_real - f_fake), axis=1)
  paper = lam * rec + (1.0 - lam) * lat
  score = knn_distance(code, params['knn_bank']) if 'knn_bank' in params else paper
  out = {'score': score, 'paper_score': paper, 'rec': rec, 'lat': lat, 'code': code}
  if return_maps:
    out['reconstruction'] = x_hat
    out['anomaly_map'] = jnp.mean(jnp.abs(images - x_hat), axis=-1)
  return out


_score_batch = jax.jit(score_terms, static_argnames=('spec', 'return_maps', 'train', 'dtype'))


def score_details(
  params, images, *, lam: float = DEFAULT_LAMBDA, return_maps: bool = False, chunk: int = MAX_CHUNK
) -> dict:
  """Scores with their terms, and on request reconstructions and anomaly maps.

  Args:
    params: {'generator': {...}, 'discriminator': {...}} variables (see module doc).
    images: (N, isize, isize, nc), uint8 in [0, 255] or float in [-1, 1].
    lam: weight of the reconstruction term.
    return_maps: also return 'reconstruction' (N, H, W, C) and 'anomaly_map' (N, H, W),
      the per-pixel mean over channels of |x - G(x)|.
    chunk: images per compiled call (the last chunk is padded; eval-mode BatchNorm makes
      every image independent of its batch).

  Returns:
    dict of arrays: 'score' (latent k-NN with a 'knn_bank', else = 'paper_score'),
    'paper_score', 'rec', 'lat' of shape (N,), 'code' (N, code), plus the maps on
    request.
  """
  spec = ModelSpec.from_variables(params)
  check_knn_bank(params, spec)
  x = check_images(images, spec)
  n = x.shape[0]
  if n <= chunk:
    return _score_batch(params, x, lam, spec, return_maps)
  parts = []
  for start in range(0, n, chunk):
    part = x[start : start + chunk]
    pad = chunk - part.shape[0]
    if pad:
      part = jnp.concatenate([part, jnp.zeros((pad,) + part.shape[1:], part.dtype)])
    out = _score_batch(params, part, lam, spec, return_maps)
    parts.append(jax.tree.map(lambda a, k=chunk - pad: a[:k], out))
  return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def score_fn(params, images, *, lam: float = DEFAULT_LAMBDA, return_maps: bool = False):
  """Anomaly scores of a batch of images (higher = more anomalous).

  Args:
    params: {'generator': {'params', 'batch_stats'}, 'discriminator': {...}} and, for
      the latent k-NN score, 'knn_bank'; as returned by `skipganomaly_jax.load(workdir)`
      or `scoring_variables`.
    images: (N, isize, isize, nc), uint8 in [0, 255] or float in [-1, 1]; any N.
    lam: weight of the reconstruction term of the paper score (0.9 as in the paper).
    return_maps: if True, also return per-pixel anomaly maps (N, isize, isize).

  Returns:
    scores of shape (N,), or (scores, maps) when return_maps is True.

  Raises:
    ValueError: images of the wrong rank, size, channel count or dtype, non-finite, or
      float values outside [-1, 1]; a 'knn_bank' of the wrong shape.
  """
  out = score_details(params, images, lam=lam, return_maps=return_maps)
  return (out['score'], out['anomaly_map']) if return_maps else out['score']
