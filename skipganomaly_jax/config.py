"""Checks of a run's ConfigDict, the config stored with a checkpoint, checkpoint selectors.

Every enumerated field is checked when a run starts (and when a stored config is read
back), so that a typo fails at once with the allowed values instead of silently meaning
the default.
"""

import dataclasses
import math

import jax.numpy as jnp
import ml_collections

# Image scores computed from the networks' outputs and codes (scoring/scores.py).
SCORE_KINDS = ('latent_knn', 'paper')
# Image scores computed from the anomaly map (scoring/localisation.py).
MAP_SCORE_KINDS = ('map_max', 'map_topk')
MAPS = ('rec', 'rec+d')
DATASET_PROTOCOLS = ('one_class', 'ganomaly')
DEVICE_DATA_SETTINGS = ('auto', 'on', 'off')
ALLOWED_NC = (1, 3)

# 'ours': eval-mode BatchNorm only; 'reference': also the reference code's test AUROC.
EVAL_PROTOCOLS = ('ours', 'reference')
DTYPES = ('float32', 'bfloat16')
CHECKPOINT_NAMES = ('latest', 'best')
# Fields renamed since older runs stored their config: old name -> new name.
RENAMED_FIELDS = {'protocol': 'eval_protocol'}


@dataclasses.dataclass(frozen=True)
class LocalisationSettings:
  """How maps and map scores are computed (config.localisation; defaults if absent)."""

  map: str = 'rec'
  d_weight: float = 1.0
  d_levels: int = 2
  sigma: float = 4.0
  topk_fraction: float = 0.01
  num_overlays: int = 4

  def __post_init__(self):
    if self.map not in MAPS:
      raise ValueError(f'config.localisation.map must be one of {MAPS}; got {self.map!r}.')
    if not (self.sigma >= 0 and math.isfinite(self.sigma)):
      raise ValueError(f'config.localisation.sigma must be >= 0 pixels; got {self.sigma!r}.')
    if not 0 < self.topk_fraction <= 1:
      raise ValueError(
        f'config.localisation.topk_fraction must be in (0, 1]; got {self.topk_fraction!r}.'
      )
    if self.map == 'rec+d' and not (self.d_levels >= 1 and self.d_weight >= 0):
      raise ValueError(
        "map='rec+d' needs config.localisation.d_levels >= 1 and d_weight >= 0; got "
        f'{self.d_levels}, {self.d_weight}.'
      )

  @classmethod
  def from_config(cls, config) -> 'LocalisationSettings':
    loc = config.get('localisation') or {}
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: loc[k] for k in names if k in loc})


def _enumerated(config) -> dict:
  """The enumerated fields of a config: dotted name -> (value, allowed values)."""
  return {
    'score_kind': (config.score_kind, SCORE_KINDS + MAP_SCORE_KINDS),
    'eval_protocol': (config.eval_protocol, EVAL_PROTOCOLS),
    'dtype': (config.dtype, DTYPES),
    'dataset.protocol': (config.dataset.protocol, DATASET_PROTOCOLS),
    # Absent from configs stored before it existed: the default.
    'device_data': (config.get('device_data', 'auto'), DEVICE_DATA_SETTINGS),
  }


def validate(config) -> None:
  """Raises ValueError naming the field and its allowed values if one is not allowed."""
  for name, (value, allowed) in _enumerated(config).items():
    if value not in allowed:
      raise ValueError(
        f'config.{name} must be one of {allowed}; got {value!r} '
        f'(set --config.{name}={allowed[0]}, for example).'
      )
  LocalisationSettings.from_config(config)  # config.localisation's fields, if any.


def compute_dtype(config):
  """The compute dtype named by `config.dtype` ('float32' or 'bfloat16')."""
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype must be one of {DTYPES}; got {config.dtype!r}.')
  return jnp.dtype(config.dtype)


def from_stored(stored: dict) -> ml_collections.ConfigDict:
  """The ConfigDict of a checkpoint's meta['config'], with renamed fields mapped, checked.

  Args:
    stored: the JSON dict written by training (`config.to_json()`).

  Returns:
    The run's config, with every field under its current name.

  Raises:
    ValueError: an enumerated field has a value this version does not know.
  """
  stored = dict(stored)
  for old, new in RENAMED_FIELDS.items():
    if old in stored and new not in stored:
      stored[new] = stored.pop(old)
  config = ml_collections.ConfigDict(stored)
  validate(config)
  return config


def checkpoint_selector(which) -> str | int:
  """'latest', 'best' or a step number (from an int or a string of digits).

  Raises:
    ValueError: anything else (names the allowed values).
  """
  if which is None:
    return 'latest'
  if isinstance(which, int) and not isinstance(which, bool) and which >= 0:
    return which
  if isinstance(which, str):
    if which in CHECKPOINT_NAMES:
      return which
    if which.strip().isdigit():
      return int(which)
  raise ValueError(
    f"checkpoint must be 'latest', 'best' or a step number (e.g. --checkpoint=120); got {which!r}."
  )
