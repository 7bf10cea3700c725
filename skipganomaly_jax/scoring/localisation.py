"""Where is the defect: per-pixel anomaly maps, image scores from them, and their report.

The map is built from the paper's two terms, per pixel, with eval-mode BatchNorm:

- 'rec': the reconstruction error (x - G(x))^2, averaged over channels, at the input
  resolution (the per-pixel form of the paper's rec term; `scores.anomaly_map`, the
  map that `score_maps` returns);
- 'rec+d': rec / m_rec + d_weight * d / m_d, where d is the squared difference of D's
  feature maps of x and G(x) at its first `d_levels` levels (isize/2, isize/4, ...),
  averaged over channels and levels after bilinear upsampling to the input size, and
  m_rec, m_d are the terms' mean values on the validation normals (so the weight is
  unit-free; never fitted on test data).

Then a Gaussian filter of standard deviation `sigma` pixels (0 = none; MVTec AD methods
commonly use 4 px at 256 px input), and an image score from the map: 'map_max' (its
maximum) or 'map_topk' (the mean of its top `topk_fraction` pixels), selectable as
`config.score_kind`. Settings: `Settings` (= config.LocalisationSpec, from
config.localisation; configs/default.py).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from skipganomaly_jax.config import MAP_SCORE_KINDS
from skipganomaly_jax.config import LocalisationSpec as Settings
from skipganomaly_jax.data import mvtec
from skipganomaly_jax.data.batches import eval_batches
from skipganomaly_jax.data.images import as_model_input
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring import metrics, pixel_metrics, placement
from skipganomaly_jax.scoring.scores import anomaly_map, generator_outputs

CHUNK = 64  # Images per compiled call.


# ----------------------------------------------------------------------------- the map


def gaussian_filter(maps, sigma: float):
  """Gaussian smoothing of (N, H, W) maps as scipy.ndimage.gaussian_filter per image.

  Separable, truncated at 4 sigma, borders mirrored ('reflect' in scipy = 'symmetric'
  in numpy); sigma 0 returns the maps unchanged.
  """
  if sigma == 0:
    return maps
  radius = int(4.0 * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  kernel = jnp.asarray(kernel / kernel.sum(), jnp.float32)
  out = jnp.asarray(maps, jnp.float32)
  for axis in (1, 2):
    pad = [(0, 0)] * 3
    pad[axis] = (radius, radius)
    padded = jnp.pad(out, pad, mode='symmetric')
    length = out.shape[axis]
    out = sum(
      kernel[i] * jax.lax.slice_in_dim(padded, i, i + length, axis=axis)
      for i in range(2 * radius + 1)
    )
  return out


def _d_features(spec: ModelSpec, variables, x, levels: int) -> list:
  """D's first `levels` feature maps (conv_0, bn_1, ...), pre-activation."""
  names = ['conv_0'] + [f'bn_{i}' for i in range(1, levels)]
  _, state = spec.discriminator().apply(
    variables,
    x,
    train=False,
    capture_intermediates=lambda module, _: module.name in names,
    mutable=['intermediates'],
  )
  found = state['intermediates']
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(f'd_levels={levels} exceeds the discriminator levels at this isize.')
  return [found[n]['__call__'][0] for n in names]


@functools.partial(jax.jit, static_argnames=('spec', 'd_levels'))
def _terms(params, images, spec: ModelSpec, d_levels: int) -> dict:
  x_hat = generator_outputs(spec, params['generator'], images)[0]  # Either model's G(x).
  out = {'rec': anomaly_map(images, x_hat)}
  if d_levels:
    size = images.shape[:3]
    real = _d_features(spec, params['discriminator'], images, d_levels)
    fake = _d_features(spec, params['discriminator'], x_hat, d_levels)
    diffs = [
      jax.image.resize(jnp.mean(jnp.square(r - f), axis=-1), size, 'linear')
      for r, f in zip(real, fake, strict=True)
    ]
    out['d'] = jnp.mean(jnp.stack(diffs), axis=0)
  return out


def _networks(variables) -> dict:
  """The networks' variables, on one device (placed once; see placement.on_one_device)."""
  return placement.on_one_device({k: variables[k] for k in ('generator', 'discriminator')})


def _device_terms(params, images, d_levels: int, chunk: int = CHUNK) -> dict:
  """`map_terms` left on the device of `params` (placed by `_networks`).

  Each chunk is uploaded explicitly and dispatched ahead of the host; the terms are
  joined on the device. Never a transfer of the weights.
  """
  spec = ModelSpec.from_variables(params)
  x = as_model_input(images, spec.isize, spec.nc)
  n, device = x.shape[0], placement.device_of(params)
  if n == 0:
    empty = np.zeros((0, spec.isize, spec.isize), np.float32)
    return jax.device_put({'rec': empty} | ({'d': empty} if d_levels else {}), device)
  flight = placement.InFlight()
  for batch in eval_batches(x, min(chunk, n)):
    flight.add(_terms(params, jax.device_put(batch, device), spec, d_levels))
  parts = flight.outputs
  # lax.slice_in_dim: a Python slice of a jax array would upload its bounds implicitly.
  return {k: jax.lax.slice_in_dim(jnp.concatenate([p[k] for p in parts]), 0, n) for k in parts[0]}


def map_terms(params, images, d_levels: int = 0, chunk: int = CHUNK) -> dict[str, np.ndarray]:
  """The unsmoothed per-pixel terms of images: {'rec': (N, H, W)[, 'd': (N, H, W)]}.

  The 'rec' map is `scores.anomaly_map` of G's reconstruction (`generator_outputs`):
  the one definition, the map that `score_details` returns.

  Args:
    params: `score_fn` variables ({'generator': ..., 'discriminator': ...}), on the host
      or the devices (placed on one device once).
    images: (N, isize, isize, nc), uint8 or float in [-1, 1] (checked as by score_fn).
    d_levels: D levels of the 'd' term (0: no 'd' term).
    chunk: images per compiled call (the batches of `eval_batches`, zero-padded).
  """
  return jax.device_get(_device_terms(_networks(params), images, d_levels, chunk))


@jax.jit
def _device_scale(terms: dict) -> dict:
  """`term_scale` on the device: each term's mean, at least 1e-12."""
  return {k: jnp.maximum(jnp.mean(v), 1e-12) for k, v in terms.items()}


def term_scale(val_terms: dict) -> dict[str, float]:
  """Each term's mean over validation-normal pixels (the unit of 'rec+d')."""
  return {k: max(float(np.mean(v)), 1e-12) for k, v in val_terms.items()}


@functools.partial(jax.jit, static_argnames=('kind', 'd_weight', 'sigma'))
def _combine(terms: dict, scale, kind: str, d_weight: float, sigma: float):
  raw = terms['rec']
  if kind != 'rec':
    raw = raw / scale['rec'] + d_weight * terms['d'] / scale['d']
  return gaussian_filter(raw, sigma)


def _device_maps(terms: dict, settings: Settings, scale=None):
  """`combine` on the device of `terms`; scale: floats or device scalars."""
  if settings.map != 'rec':
    if scale is None or 'd' not in terms:
      raise ValueError("map='rec+d' needs the 'd' term and the validation scale.")
    device = placement.device_of(terms)
    scale = {
      k: jax.device_put(np.float32(scale[k]) if np.isscalar(scale[k]) else scale[k], device)
      for k in ('rec', 'd')
    }
  else:
    scale = None  # Not an input of the 'rec' map's program.
  return _combine(terms, scale, settings.map, float(settings.d_weight), float(settings.sigma))


def combine(terms: dict, settings: Settings, scale: dict | None = None) -> np.ndarray:
  """The smoothed (N, H, W) anomaly map from `map_terms` output.

  Args:
    terms: {'rec': ...[, 'd': ...]} from `map_terms`.
    settings: the map kind, weight and sigma.
    scale: `term_scale` of the validation normals (needed for 'rec+d').
  """
  return jax.device_get(_device_maps(placement.on_one_device(terms), settings, scale))


def image_scores(maps, kind: str, topk_fraction: float = 0.01) -> np.ndarray:
  """Image scores from (N, H, W) maps: 'map_max' or 'map_topk' (mean of the top pixels).

  The top-k mean averages the ceil(topk_fraction * H * W) highest pixels of each map.
  """
  maps = np.asarray(maps, np.float64).reshape(len(maps), -1)
  if kind == 'map_max':
    return maps.max(axis=1) if maps.size else np.zeros(0)
  if kind != 'map_topk':
    raise ValueError(f'Unknown map score {kind!r}; choose from {MAP_SCORE_KINDS}.')
  k = max(1, math.ceil(topk_fraction * maps.shape[1]))
  return np.mean(np.partition(maps, maps.shape[1] - k, axis=1)[:, -k:], axis=1)


def _d_levels(settings: Settings) -> int:
  return settings.d_levels if settings.map == 'rec+d' else 0


def anomaly_maps(params, images, settings: Settings, scale: dict | None = None) -> np.ndarray:
  """Smoothed (N, H, W) anomaly maps of images (see the module doc)."""
  terms = _device_terms(_networks(params), images, _d_levels(settings))
  return jax.device_get(_device_maps(terms, settings, scale))


def score_images(params, images, kind: str, settings: Settings, terms: dict | None = None) -> dict:
  """{'score', 'anomaly_map'} of images with a run's map score (`--mode=score`).

  Args:
    params: `score_fn` variables.
    images: (N, isize, isize, nc) images.
    kind: the map score, 'map_max' or 'map_topk'.
    settings: the run's localisation settings.
    terms: `term_scale` of the run's validation normals (`MapScale.terms`, stored with
      its checkpoint): 'rec+d' needs it for its units ('rec' does not).

  Raises:
    ValueError: 'rec+d' without `terms`.
  """
  if settings.map == 'rec+d' and terms is None:
    raise ValueError("map='rec+d' needs the validation normals' term scale (MapScale.terms).")
  maps = anomaly_maps(params, images, settings, terms if settings.map == 'rec+d' else None)
  return {'score': image_scores(maps, kind, settings.topk_fraction), 'anomaly_map': maps}


# ----------------------------------------------------------------------------- maps to read

# The maps a person reads (reconstructions.png, localisation.png, --mode=score --maps) are
# the run's map above divided by its "normal level": this percentile of the map over
# every validation-normal pixel. 1 = as high as the top 0.1% of normal pixels get;
# pictures clip at DISPLAY_MAX, the top of every colour scale and of the PNGs' grey levels
# (twice the normal level: on the brick textures, defects peak at 1-4 normal levels and
# normal images at 0.3-2.3, so a higher top leaves most defects dim).
UNIT_PERCENTILE = 99.9
DISPLAY_MAX = 2.0
UNIT_NAME = 'normal p99.9'  # How figures name the unit.


@dataclasses.dataclass(frozen=True)
class MapScale:
  """What puts a run's maps on the fixed scale of its pictures; from validation normals.

  Attributes:
    unit: the raw map value shown as 1: the `percentile`-th percentile of the run's
      (smoothed) map over every validation-normal pixel.
    terms: `term_scale` of the validation normals (the 'rec+d' map's term units).
    percentile: UNIT_PERCENTILE.
    num_val: the validation images it was computed from.
  """

  unit: float
  terms: dict
  percentile: float = UNIT_PERCENTILE
  num_val: int = 0

  def to_dict(self) -> dict:
    """A JSON-safe dict (to store with a checkpoint)."""
    return {
      'unit': float(self.unit),
      'terms': {k: float(v) for k, v in self.terms.items()},
      'percentile': float(self.percentile),
      'num_val': int(self.num_val),
    }

  @classmethod
  def from_dict(cls, d: dict) -> 'MapScale':
    return cls(float(d['unit']), dict(d['terms']), float(d['percentile']), int(d['num_val']))


def map_scale(params, val, settings: Settings) -> MapScale:
  """The `MapScale` of a model's maps, from its validation normals `val`."""
  val_terms = _device_terms(_networks(params), val, _d_levels(settings))
  scale = _device_scale(val_terms)
  maps, scale = jax.device_get((_device_maps(val_terms, settings, scale), scale))
  terms = {k: float(v) for k, v in scale.items()}
  unit = float(np.percentile(maps, UNIT_PERCENTILE)) if maps.size else 0.0
  return MapScale(max(unit, 1e-12), terms, UNIT_PERCENTILE, len(val))


def display_maps(params, images, settings: Settings, scale: MapScale) -> np.ndarray:
  """The run's (N, H, W) maps of images in units of `scale.unit` (not clipped)."""
  return anomaly_maps(params, images, settings, scale.terms) / np.float32(scale.unit)


def describe(settings: Settings, scale: MapScale) -> str:
  """One sentence: what a displayed map is, with the run's numbers."""
  if settings.map == 'rec':
    raw = '(x - G(x))^2 averaged over channels, x and G(x) in [-1, 1]'
  else:
    raw = (
      f'(x - G(x))^2 / {scale.terms["rec"]:.4g} + {settings.d_weight:g} x D-feature '
      f'differences (first {settings.d_levels} levels) / {scale.terms["d"]:.4g}'
    )
  return (
    f"the run's localisation map ({raw}; Gaussian sigma {settings.sigma:g} px) divided "
    f'by {scale.unit:.4g}, the {scale.percentile:g}th percentile of that map over the '
    f"{scale.num_val} validation normals' pixels: 1 = the normal level; shown up to "
    f'{DISPLAY_MAX:g}'
  )


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Result:
  """What `evaluate` adds to a report and, for map score kinds, the scores to use."""

  report: dict
  val_scores: np.ndarray | None = None
  test_scores: np.ndarray | None = None
  test_maps: np.ndarray | None = None


def needed(kind: str, splits) -> bool:
  """True when the run's score `kind` is a map score or its test set has masks."""
  return kind in MAP_SCORE_KINDS or splits.test_masks is not None


def _per_defect(splits, maps, scores) -> dict:
  kinds = mvtec.defect_kinds(splits)
  if kinds is None or splits.test_masks is None:
    return {}
  out = {}
  for kind in sorted(set(kinds[splits.test_labels == 1])):
    pick = (splits.test_labels == 0) | (kinds == kind)
    out[kind] = {
      'map_auroc': metrics.auroc(splits.test_labels[pick], scores[pick]),
      **pixel_metrics.evaluate_pixels(maps[pick], splits.test_masks[pick]),
    }
  return out


def evaluate(variables, splits, kind: str, settings: Settings) -> Result:
  """Maps of the validation and test images; pixel metrics when the test set has masks.

  Args:
    variables: the scoring variables, on the devices (a local copy is used: no
      transfer) or the host (copied to one device once).
    splits: the run's `DataSplits`.
    kind: the run's score kind (config.score_kind).
    settings: the run's localisation settings.

  Returns:
    A `Result`: report keys 'map_max_auroc', 'map_topk_auroc' and, with masks,
    'pixel_auroc', 'pro' (up to FPR 0.3) and 'per_defect'; val/test scores when
    `kind` is a map score (they then replace the run's scores).
  """
  params, d_levels = _networks(variables), _d_levels(settings)
  val_terms = _device_terms(params, splits.val, d_levels)
  scale = _device_scale(val_terms)  # Stays on the device: nothing waits for it.
  test_maps = _device_maps(_device_terms(params, splits.test, d_levels), settings, scale)
  val_maps = _device_maps(val_terms, settings, scale) if kind in MAP_SCORE_KINDS else None
  maps, val_maps = jax.device_get((test_maps, val_maps))  # The one gather.
  scores = {k: image_scores(maps, k, settings.topk_fraction) for k in MAP_SCORE_KINDS}
  report = {f'{k}_auroc': metrics.auroc(splits.test_labels, s) for k, s in scores.items()}
  result = Result(report=report, test_maps=maps)
  if splits.test_masks is not None:
    report.update(pixel_metrics.evaluate_pixels(maps, splits.test_masks))
    report['per_defect'] = _per_defect(splits, maps, scores[_map_kind(kind)])
  if kind in MAP_SCORE_KINDS:
    result.val_scores = image_scores(val_maps, kind, settings.topk_fraction)
    result.test_scores = scores[kind]
  return result


def _map_kind(kind: str) -> str:
  return kind if kind in MAP_SCORE_KINDS else 'map_max'


def summary(report: dict) -> str:
  """', pixel AUROC x, PRO y' when the report has them, else ''."""
  if 'pixel_auroc' not in report:
    return ''
  return f', pixel AUROC {report["pixel_auroc"]:.4f}, PRO {report["pro"]:.4f}'
