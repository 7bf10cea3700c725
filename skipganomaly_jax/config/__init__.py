"""A run's config: every allowed value, every check, and the typed specs built from it.

Layer 0: imports nothing else from the package. The ConfigDict stops here:
`specs(config)` checks every field (`validate`) and returns `RunSpecs`, small frozen
dataclasses (data, model, loss, optim, train, score, localisation) that the lower layers
take instead of the config. The same checks run when training starts, before any data is
read, and when a checkpoint's stored config is read back (`from_stored`), so a typo or an
out-of-range value fails at once, naming the field, the value, what is allowed and a
value to set.

- fields.py: `FIELDS`, the table of every field (its rule and default), the allowed
  values, and the checks that lower layers share (`check_geometry`,
  `check_batch_divisible`, `check_drop_outer_skips`, `check_model_options`,
  `compute_dtype`).
- run_specs.py: the spec dataclasses, `validate`, `specs`, `from_stored`.
"""

from skipganomaly_jax.config.fields import (
  ALLOWED_NC,
  CHECKPOINT_NAMES,
  CONV_IMPLS,
  DATASET_PROTOCOLS,
  DEFAULT_LAMBDA,
  DEVICE_DATA_SETTINGS,
  DTYPES,
  EVAL_PROTOCOLS,
  FIELDS,
  KNN_K,
  MAP_SCORE_KINDS,
  MAPS,
  MIN_ISIZE,
  MODEL_NAMES,
  RENAMED_FIELDS,
  SCORE_KINDS,
  Field,
  Rule,
  check_batch_divisible,
  check_drop_outer_skips,
  check_field,
  check_geometry,
  check_model_options,
  checkpoint_selector,
  compute_dtype,
  d_feature_levels,
  isize_allowed,
)
from skipganomaly_jax.config.run_specs import (
  DataSpec,
  LocalisationSpec,
  LossSpec,
  ModelSettings,
  OptimSpec,
  RunSpecs,
  ScoreSpec,
  TrainSpec,
  from_stored,
  specs,
  validate,
  values,
)

__all__ = [
  'ALLOWED_NC',
  'CHECKPOINT_NAMES',
  'CONV_IMPLS',
  'DATASET_PROTOCOLS',
  'DEFAULT_LAMBDA',
  'DEVICE_DATA_SETTINGS',
  'DTYPES',
  'EVAL_PROTOCOLS',
  'FIELDS',
  'KNN_K',
  'MAPS',
  'MAP_SCORE_KINDS',
  'MIN_ISIZE',
  'MODEL_NAMES',
  'RENAMED_FIELDS',
  'SCORE_KINDS',
  'DataSpec',
  'Field',
  'LocalisationSpec',
  'LossSpec',
  'ModelSettings',
  'OptimSpec',
  'Rule',
  'RunSpecs',
  'ScoreSpec',
  'TrainSpec',
  'check_batch_divisible',
  'check_drop_outer_skips',
  'check_field',
  'check_geometry',
  'check_model_options',
  'checkpoint_selector',
  'compute_dtype',
  'd_feature_levels',
  'from_stored',
  'isize_allowed',
  'specs',
  'validate',
  'values',
]
