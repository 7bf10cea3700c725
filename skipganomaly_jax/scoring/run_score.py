"""What defines a trained run's score, carried in its params: `RunScore`.

A run is scored one way (its config's score_kind, score_lambda, dtype and localisation
settings, and for the 'rec+d' map the validation normals' term units stored with the
checkpoint), and its calibration's threshold holds for that score only.
`skipganomaly_jax.load` puts a `RunScore` under params['run_score'], so that
`score_fn(params, images)` computes exactly the score the run was evaluated and
calibrated with, and `export` exports it; params without one (`scoring_variables`)
are scored as before: the paper score with lam = 0.9 in float32, or latent k-NN with a
'knn_bank'.

`RunScore` is registered with `jax.tree_util.register_static`: a hashable pytree node
without leaves, so params that carry it still work with `jax.jit` (it is part of the
compiled program's signature, like a static argument), `jax.tree.map`,
`jax.device_put` and `jax.device_get`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from skipganomaly_jax.config import (
  DEFAULT_LAMBDA,
  MAP_SCORE_KINDS,
  LocalisationSpec,
  ModelSettings,
  ScoreSpec,
  check_field,
  compute_dtype,
)
from skipganomaly_jax.nets.models import ModelSpec

KEY = 'run_score'  # Where params carry it.


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RunScore:
  """Everything that defines a run's score beyond its networks' weights (and k-NN bank).

  Attributes:
    model: the run's networks (`ModelSpec`; its name picks the model's paper score).
      Checked against the shapes of the params that carry it.
    kind: the run's score, config.score_kind: 'paper', 'latent_knn' (scored with the
      params' 'knn_bank'), 'map_max' or 'map_topk' (from the run's anomaly map).
    lam: config.score_lambda, lam of Skip-GANomaly's paper score.
    dtype: config.dtype, the compute dtype of the networks' scores. The map scores are
      computed in float32 whatever it is, as the run's evaluation computes them.
    maps: the run's localisation settings (map, sigma, d_weight, d_levels,
      topk_fraction), for map kinds; None otherwise.
    map_units: for the 'rec+d' map, its terms' units: ((name, mean over the validation
      normals' pixels), ...), `MapScale.terms` stored with the checkpoint; () otherwise.
  """

  model: ModelSpec
  kind: str = 'paper'
  lam: float = DEFAULT_LAMBDA
  dtype: str = 'float32'
  maps: LocalisationSpec | None = None
  map_units: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    if not isinstance(self.model, ModelSpec):
      raise TypeError(f'RunScore.model must be a ModelSpec; got {type(self.model).__name__}.')
    check_field('score_kind', self.kind)
    check_field('score_lambda', self.lam)
    check_field('dtype', self.dtype)
    if self.is_map and self.maps is None:
      raise ValueError(
        f'score kind {self.kind!r} is computed from the anomaly map: RunScore needs its '
        'localisation settings (maps=config.specs(config).localisation).'
      )
    if self.is_map and self.maps.map == 'rec+d':
      units = dict(self.map_units)
      if sorted(units) != ['d', 'rec'] or min(units.values()) <= 0:
        raise ValueError(
          "the 'rec+d' map is in units of the validation normals' mean terms: RunScore "
          "needs map_units=(('d', m_d), ('rec', m_rec)), both > 0 (MapScale.terms, stored "
          f'with an evaluated checkpoint); got {self.map_units!r}.'
        )

  @property
  def is_map(self) -> bool:
    """Whether the score is computed from the anomaly map ('map_max', 'map_topk')."""
    return self.kind in MAP_SCORE_KINDS

  @property
  def compute_dtype(self):
    """The networks' compute dtype (a numpy dtype)."""
    return compute_dtype(self.dtype)

  @property
  def units(self) -> dict[str, float]:
    """The 'rec+d' map's term units as a dict ({} for other maps)."""
    return dict(self.map_units)

  @classmethod
  def from_specs(
    cls,
    model: ModelSettings,
    score: ScoreSpec,
    maps: LocalisationSpec,
    map_terms: dict | None = None,
  ) -> 'RunScore':
    """The RunScore of a run's checked specs.

    Args:
      model: the run's model settings (`config.specs(config).model`).
      score: its score spec (kind, lam, dtype).
      maps: its localisation settings (kept for map kinds only).
      map_terms: `MapScale.terms` of the evaluated checkpoint (needed for kind
        'map_max' / 'map_topk' with map 'rec+d' only).
    """
    is_map = score.kind in MAP_SCORE_KINDS
    needs_units = is_map and maps.map == 'rec+d'
    units = tuple(sorted((str(k), float(v)) for k, v in (map_terms or {}).items()))
    return cls(
      model=ModelSpec.from_settings(model),
      kind=score.kind,
      lam=float(score.lam),
      dtype=score.dtype,
      maps=maps if is_map else None,
      map_units=units if needs_units else (),
    )

  def describe(self) -> dict:
    """A JSON-safe description of the score (detector.json's 'score')."""
    out = {'kind': self.kind, 'model': self.model.name, 'dtype': self.dtype}
    if self.model.name == 'skipganomaly':  # GANomaly's own paper score has no lambda.
      out['paper_score_lambda'] = float(self.lam)
    if self.is_map:
      settings = dataclasses.asdict(self.maps)
      settings.pop('num_overlays')  # Pictures only.
      out['map'] = settings
      if self.map_units:
        out['map']['units'] = self.units
    return out


def of(params) -> RunScore | None:
  """The `RunScore` that params carry, or None (bare params).

  Raises:
    TypeError: params['run_score'] is something else.
  """
  run = params.get(KEY) if hasattr(params, 'get') else None
  if run is not None and not isinstance(run, RunScore):
    raise TypeError(
      f"params['{KEY}'] must be a scoring.run_score.RunScore (as skipganomaly_jax.load "
      f'puts there); got {type(run).__name__}. Drop the key to score bare networks.'
    )
  return run


def check(run: RunScore, spec: ModelSpec) -> None:
  """Raises ValueError unless the networks of the params (`spec`, read from their shapes)
  are the run's."""
  mine = dataclasses.replace(run.model, conv_impl=spec.conv_impl)
  if mine != spec:
    raise ValueError(
      f"params['{KEY}'] describes the networks {run.model}, but the params' weights are "
      f'{spec}: they belong to another run. Load params and RunScore together with '
      "skipganomaly_jax.load(workdir), or drop params['run_score'] to score these networks "
      'bare.'
    )


def map_scores(params, images, spec: ModelSpec, run: RunScore, x_hat=None) -> dict:
  """The run's map scores, {'map_max', 'map_topk'} (N,), of a batch; jittable.

  The map is localisation's (`localisation.anomaly_maps`): 'rec' = `anomaly_map`, or
  'rec+d' = rec / m_rec + d_weight * d / m_d in the run's units (`run.map_units`),
  smoothed by `localisation.gaussian_filter`; all in float32 with eval-mode BatchNorm,
  as the run's evaluation computes it. 'map_max' is its maximum, 'map_topk' the mean of
  its ceil(topk_fraction * H * W) highest pixels (`localisation.image_scores`).

  Args:
    params: scoring variables.
    images: float32 [-1, 1] batch.
    spec: the architecture.
    run: the run's `RunScore`, of a map kind.
    x_hat: G's float32 eval-mode reconstruction of images, if already computed.
  """
  # Imported here: localisation builds on scores.py, which builds on this module.
  from skipganomaly_jax.scoring import localisation, scores  # noqa: PLC0415

  settings = run.maps
  if settings.map == 'rec+d':
    terms = localisation._terms(params, images, spec, settings.d_levels)
    units = run.units
    raw = terms['rec'] / units['rec'] + settings.d_weight * terms['d'] / units['d']
  elif x_hat is not None:
    raw = scores.anomaly_map(images, x_hat)
  else:
    raw = localisation._terms(params, images, spec, 0)['rec']
  maps = localisation.gaussian_filter(raw, float(settings.sigma))
  maps = maps.reshape(maps.shape[0], -1)  # The batch may be symbolic (export).
  k = max(1, math.ceil(settings.topk_fraction * maps.shape[1]))
  return {'map_max': jnp.max(maps, axis=1), 'map_topk': jnp.mean(jax.lax.top_k(maps, k)[0], axis=1)}
