"""A run's config turned into typed specs, once checked; configs stored by older runs.

`specs(config)` checks every field (`validate`: the rules of `fields.FIELDS`, the rules
between fields, the batches against the device count) and returns `RunSpecs`, small
frozen dataclasses that the lower layers take instead of the ConfigDict. Each spec
attribute names its config field, takes that field's default, and is checked with its
rule when a spec is built directly. `from_stored` reads a checkpoint's config back:
renamed fields mapped, fields added since the run filled in with their defaults, checked.
"""

import copy
import dataclasses
import difflib
import math
from typing import Any

import ml_collections

from skipganomaly_jax.config.fields import (
  FIELDS,
  RENAMED_FIELDS,
  _problem,
  check_batch_divisible,
  check_drop_outer_skips,
  check_field,
  check_model_options,
  d_feature_levels,
)


def _from(name: str):
  """A spec attribute read from config field `name`, with that field's default."""
  return dataclasses.field(default=FIELDS[name].default, metadata={'config': name})


def _check_spec(spec) -> None:
  for f in dataclasses.fields(spec):
    check_field(f.metadata['config'], getattr(spec, f.name))


def _spec(cls):
  """A frozen dataclass whose construction checks every field with the config's rules."""
  if '__post_init__' not in cls.__dict__:
    cls.__post_init__ = _check_spec
  return dataclasses.dataclass(frozen=True)(cls)


@_spec
class DataSpec:
  """What data to load and how to split it (config.dataset.*, isize, nc, batch_size).

  batch_size is the global training batch, which the training split must fill.
  """

  name: str = _from('dataset.name')
  data_dir: str = _from('dataset.data_dir')
  root: str = _from('dataset.root')
  path: str = _from('dataset.path')
  category: str = _from('dataset.category')
  abnormal_class: str | int = _from('dataset.abnormal_class')
  protocol: str = _from('dataset.protocol')
  seed: int = _from('dataset.seed')
  val_fraction: float = _from('dataset.val_fraction')
  isize: int = _from('isize')
  nc: int = _from('nc')
  batch_size: int = _from('batch_size')


@_spec
class ModelSettings:
  """The networks' shapes (isize, nc, config.model.*) and how their convolutions compute;
  `nets.models.ModelSpec.from_settings` builds the networks from them."""

  isize: int = _from('isize')
  nc: int = _from('nc')
  ngf: int = _from('model.ngf')
  ndf: int = _from('model.ndf')
  nz: int = _from('model.nz')
  drop_outer_skips: int = _from('model.drop_outer_skips')
  name: str = _from('model.name')  # 'skipganomaly' or 'ganomaly'.
  extra_layers: int = _from('model.extra_layers')  # GANomaly only.
  conv_impl: str = _from('model.conv_impl')  # 'auto', 'lax' or 'fast' (same parameters).

  def __post_init__(self):
    _check_spec(self)
    check_drop_outer_skips(self.drop_outer_skips, int(math.log2(self.isize)))
    check_model_options(self.name, self.ngf, self.ndf, self.drop_outer_skips, self.extra_layers)


@_spec
class LossSpec:
  """The loss weights and the D re-initialisation guard (config.loss.*)."""

  w_adv: float = _from('loss.w_adv')
  w_con: float = _from('loss.w_con')
  w_lat: float = _from('loss.w_lat')
  w_enc: float = _from('loss.w_enc')  # GANomaly only: its encoder loss.
  d_latent: bool = _from('loss.d_latent')
  d_reinit_threshold: float = _from('loss.d_reinit_threshold')


@_spec
class OptimSpec:
  """Adam's constant learning rate and betas (config.optim.*)."""

  lr: float = _from('optim.lr')
  b1: float = _from('optim.b1')
  b2: float = _from('optim.b2')


@_spec
class TrainSpec:
  """The training loop: seed, batches, epochs, logging, checkpoints, compute dtype."""

  seed: int = _from('seed')
  batch_size: int = _from('batch_size')
  num_epochs: int = _from('num_epochs')
  max_steps_per_epoch: int = _from('max_steps_per_epoch')
  log_every_steps: int = _from('log_every_steps')
  device_data: str = _from('device_data')
  keep_checkpoints: int = _from('keep_checkpoints')
  dtype: str = _from('dtype')


@_spec
class ScoreSpec:
  """How a run scores and judges images (evaluation, calibration, the k-NN bank)."""

  kind: str = _from('score_kind')  # The run's score.
  lam: float = _from('score_lambda')  # lam of the paper score.
  knn_bank_size: int = _from('knn_bank_size')
  threshold_percentile: float = _from('threshold_percentile')
  eval_protocol: str = _from('eval_protocol')
  eval_batch_size: int = _from('eval_batch_size')
  dtype: str = _from('dtype')  # The compute dtype's name.
  seed: int = _from('seed')  # Seeds the k-NN bank's subset.


@_spec
class LocalisationSpec:
  """How maps and map scores are computed (config.localisation.*)."""

  map: str = _from('localisation.map')
  d_weight: float = _from('localisation.d_weight')
  d_levels: int = _from('localisation.d_levels')
  sigma: float = _from('localisation.sigma')
  topk_fraction: float = _from('localisation.topk_fraction')
  num_overlays: int = _from('localisation.num_overlays')


@dataclasses.dataclass(frozen=True)
class RunSpecs:
  """Every spec of one run, built from its checked config by `specs`."""

  data: DataSpec = dataclasses.field(default_factory=DataSpec)
  model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
  loss: LossSpec = dataclasses.field(default_factory=LossSpec)
  optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
  train: TrainSpec = dataclasses.field(default_factory=TrainSpec)
  score: ScoreSpec = dataclasses.field(default_factory=ScoreSpec)
  localisation: LocalisationSpec = dataclasses.field(default_factory=LocalisationSpec)


# ----------------------------------------------------------------------------- the config


def _flatten(tree, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if hasattr(value, 'items') and not isinstance(value, str):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _unknown(name: str) -> ValueError:
  renamed = {old: new for old, new in RENAMED_FIELDS.items() if name == old}
  if renamed:
    hint = f'it was renamed config.{renamed[name]}'
  else:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    hint = f'did you mean config.{close[0]}?' if close else 'see configs/default.py'
  return ValueError(f'config.{name} is not a config field ({hint}).')


def values(config) -> dict[str, Any]:
  """Every field's value by dotted name, in FIELDS' order; absent fields take defaults.

  Raises:
    ValueError: a field that is not in FIELDS (a typo: the message names the closest).
  """
  flat = _flatten(config)
  for name in flat:
    if name not in FIELDS:
      raise _unknown(name)
  return {name: flat.get(name, field.default) for name, field in FIELDS.items()}


def validate(config, devices: int | None = None) -> None:
  """Checks every field of a config; raises ValueError naming the first bad one.

  Args:
    config: a ConfigDict (or nested dict) of the fields of configs/default.py; absent
      fields take their defaults, unknown ones are refused.
    devices: the number of devices of the run's mesh (all processes): both batches
      must split evenly over them. None skips that check.
  """
  flat = values(config)
  for name, value in flat.items():
    check_field(name, value)
  check_drop_outer_skips(flat['model.drop_outer_skips'], int(math.log2(flat['isize'])))
  check_model_options(
    *(flat[f'model.{k}'] for k in ('name', 'ngf', 'ndf', 'drop_outer_skips', 'extra_layers'))
  )
  levels = d_feature_levels(flat['isize'])
  if flat['localisation.d_levels'] > levels:
    allowed = (
      f'an integer in [1, {levels}] (the discriminator has {levels} feature levels at '
      f'isize {flat["isize"]})'
    )
    raise _problem('localisation.d_levels', allowed, flat['localisation.d_levels'], 1)
  if devices:
    for name in ('batch_size', 'eval_batch_size'):
      check_batch_divisible(flat[name], devices, name)


def _build(cls, flat: dict):
  return cls(**{f.name: flat[f.metadata['config']] for f in dataclasses.fields(cls)})


def specs(config, devices: int | None = None) -> RunSpecs:
  """The checked specs of a run's config (see `validate`; raises its ValueError)."""
  validate(config, devices)
  flat = values(config)
  return RunSpecs(**{f.name: _build(f.type, flat) for f in dataclasses.fields(RunSpecs)})


def _nest(flat: dict) -> dict:
  out = {}
  for name, value in flat.items():
    *parents, leaf = name.split('.')
    node = out
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return out


def from_stored(stored: dict) -> ml_collections.ConfigDict:
  """The ConfigDict of a checkpoint's meta['config'], complete and checked.

  Args:
    stored: the JSON dict written by training (`config.to_json()`), by this version or
      an older one.

  Returns:
    The run's config with every field under its current name; fields the run did not
    store (added since) take their defaults.

  Raises:
    ValueError: a field has a value this version does not allow, or is unknown.
  """
  stored = copy.deepcopy(dict(stored))
  for old, new in RENAMED_FIELDS.items():
    if old in stored:
      value = stored.pop(old)
      stored.setdefault(new, value)
  config = ml_collections.ConfigDict(_nest(values(stored)))
  validate(config)
  return config
