"""Every config field: what it allows, its default, and the checks shared with lower layers.

`FIELDS` is the one table of a run's config fields (those of configs/default.py, in its
order): each field's rule, whose text is the words of its error message, and its default.
`check_field` gives every error the same form: the field, the value, what is allowed and
a value to set. The rules that lower layers also check on direct use live here once:
the image geometry (`check_geometry`), a batch split over devices or processes
(`check_batch_divisible`), the U-Net's skips (`check_drop_outer_skips`) and the
model fields that only one model has (`check_model_options`).
"""

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

# Image scores computed from the networks' outputs and codes (scoring/scores.py).
SCORE_KINDS = ('latent_knn', 'paper')
# The models: Skip-GANomaly (the default, nets/models.py) and its baseline GANomaly
# (nets/ganomaly.py), trained by the same step and scored by the same functions.
MODEL_NAMES = ('skipganomaly', 'ganomaly')
# How the networks' convolutions compute (nets/layers.py), with the same parameters:
# 'auto' (CPU: the custom_vjp paths; GPU/TPU: plain `lax`), 'lax' (plain `lax` ops with
# jax's autodiff everywhere: the graph accelerators run) or 'fast' (the custom_vjp paths
# everywhere, for tests).
CONV_IMPLS = ('auto', 'lax', 'fast')
# Image scores computed from the anomaly map (scoring/localisation.py).
MAP_SCORE_KINDS = ('map_max', 'map_topk')
MAPS = ('rec', 'rec+d')
DATASET_PROTOCOLS = ('one_class', 'ganomaly')
DEVICE_DATA_SETTINGS = ('auto', 'on', 'off')
ALLOWED_NC = (1, 3)  # Image channels: grayscale or RGB.
MIN_ISIZE = 32  # The smallest image side; sides are powers of two.
# 'ours': eval-mode BatchNorm only; 'reference': also the reference code's test AUROC.
EVAL_PROTOCOLS = ('ours', 'reference')
DTYPES = ('float32', 'bfloat16')
CHECKPOINT_NAMES = ('latest', 'best')
DEFAULT_LAMBDA = 0.9  # lam of the paper score, as the paper (score_lambda's default).
KNN_K = 5  # Neighbours averaged by the latent k-NN score; the bank needs at least this many.
# Fields renamed since older runs stored their config: old name -> new name.
RENAMED_FIELDS = {'protocol': 'eval_protocol'}


# ----------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field allows: `text` says it in error messages, `test` checks a value."""

  text: str
  test: Callable[[Any], bool]


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  real = isinstance(value, numbers.Real) and not isinstance(value, bool)
  return real and math.isfinite(value)


def _one_of(allowed: tuple, text: str | None = None) -> Rule:
  def same(value, option) -> bool:
    kind_ok = _is_int(value) if _is_int(option) else isinstance(value, type(option))
    return kind_ok and value == option

  return Rule(text or f'one of {allowed}', lambda v: any(same(v, a) for a in allowed))


def _integer(low: int, high: int | None = None) -> Rule:
  text = f'an integer >= {low}' if high is None else f'an integer in [{low}, {high}]'
  return Rule(text, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def _number(low, high=None, low_open: bool = False, high_open: bool = False) -> Rule:
  """A finite real number above `low` (and below `high`), bounds included unless open."""
  if high is None:
    text = f'a finite number {">" if low_open else ">="} {low}'
  else:
    text = f'a number in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'

  def test(v) -> bool:
    if not _is_real(v) or (v <= low if low_open else v < low):
      return False
    return high is None or (v < high if high_open else v <= high)

  return Rule(text, test)


def _text(nonempty: bool = False) -> Rule:
  if nonempty:
    return Rule('a non-empty string', lambda v: isinstance(v, str) and bool(v.strip()))
  return Rule("a string ('' for none)", lambda v: isinstance(v, str))


def isize_allowed(isize) -> bool:
  """Whether isize is a power of two >= MIN_ISIZE: the one rule of the image side."""
  return _is_int(isize) and isize >= MIN_ISIZE and not isize & (isize - 1)


_BOOL = Rule('True or False', lambda v: isinstance(v, bool))
_ISIZE = Rule(f'a power of two >= {MIN_ISIZE} ({MIN_ISIZE}, 64, 128, ...)', isize_allowed)
_NC = _one_of(ALLOWED_NC, '1 or 3 (grayscale or RGB)')
_EXTRA_LAYERS = Rule(
  'an integer >= 0 (GANomaly only: 3x3 conv layers added at the first level of each of '
  "its encoders, decoder and D, the authors' extralayers; 0 for Skip-GANomaly)",
  lambda v: _is_int(v) and v >= 0,
)
_CLASS = Rule(
  "a class index or name as a non-empty string (e.g. '3' or 'automobile')",
  lambda v: (isinstance(v, str) and bool(v.strip())) or (_is_int(v) and v >= 0),
)


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: what it allows, its default (configs/default.py's value; also
  the value of a field absent from an older run's stored config) and an example value
  for error messages when the default is not a good one."""

  rule: Rule
  default: Any
  example: Any = None


# Every field of configs/default.py (where each is commented), in its order.
FIELDS: dict[str, Field] = {
  'seed': Field(_integer(0), 0),
  'isize': Field(_ISIZE, 32),
  'nc': Field(_NC, 3),
  'dataset.name': Field(_text(nonempty=True), 'cifar10', 'mnist_offline'),
  'dataset.data_dir': Field(_text(), ''),
  'dataset.root': Field(_text(), '', '/path/to/ROOT'),
  'dataset.path': Field(_text(), '', '/path/to/data.npz'),
  'dataset.category': Field(_text(), ''),
  'dataset.abnormal_class': Field(_CLASS, 'automobile', '0'),
  'dataset.protocol': Field(_one_of(DATASET_PROTOCOLS), 'one_class'),
  'dataset.seed': Field(_integer(0), 0),
  'dataset.val_fraction': Field(_number(0, 1, low_open=True, high_open=True), 0.05),
  'model.name': Field(_one_of(MODEL_NAMES), 'skipganomaly'),
  'model.ngf': Field(_integer(1), 64),
  'model.ndf': Field(_integer(1), 64),
  'model.nz': Field(_integer(1), 100),
  'model.drop_outer_skips': Field(_integer(0), 0),
  'model.extra_layers': Field(_EXTRA_LAYERS, 0),
  'model.conv_impl': Field(_one_of(CONV_IMPLS), 'auto'),
  'dtype': Field(_one_of(DTYPES), 'float32'),
  'loss.w_adv': Field(_number(0), 1.0),
  'loss.w_con': Field(_number(0), 50.0),
  'loss.w_lat': Field(_number(0), 1.0),
  'loss.w_enc': Field(_number(0), 1.0),
  'loss.d_latent': Field(_BOOL, True),
  'loss.d_reinit_threshold': Field(_number(0), 1e-5),
  'optim.lr': Field(_number(0, low_open=True), 2e-4),
  'optim.b1': Field(_number(0, 1, high_open=True), 0.5),
  'optim.b2': Field(_number(0, 1, high_open=True), 0.999),
  'batch_size': Field(_integer(1), 64),
  'eval_batch_size': Field(_integer(1), 256),
  'num_epochs': Field(_integer(1), 15),
  'max_steps_per_epoch': Field(_integer(0), 0),
  'log_every_steps': Field(_integer(1), 50),
  'device_data': Field(_one_of(DEVICE_DATA_SETTINGS), 'auto'),
  'score_kind': Field(_one_of(SCORE_KINDS + MAP_SCORE_KINDS), 'paper'),
  'knn_bank_size': Field(_integer(KNN_K), 20000),
  'score_lambda': Field(_number(0, 1), DEFAULT_LAMBDA),
  'threshold_percentile': Field(_number(0, 100), 95.0),
  'keep_checkpoints': Field(_integer(1), 2),
  'eval_protocol': Field(_one_of(EVAL_PROTOCOLS), 'ours'),
  'localisation.map': Field(_one_of(MAPS), 'rec'),
  'localisation.d_weight': Field(_number(0), 1.0),
  'localisation.d_levels': Field(_integer(1), 2),
  'localisation.sigma': Field(_number(0), 4.0),
  'localisation.topk_fraction': Field(_number(0, 1, low_open=True), 0.01),
  'localisation.num_overlays': Field(_integer(1), 4),
}


def _flag_value(value) -> str:
  return "''" if value == '' else str(value)


def _problem(name: str, allowed: str, value, example) -> ValueError:
  """The one form of a field's error: the field, what it allows, its value, a fix."""
  return ValueError(
    f'config.{name} must be {allowed}; got {value!r} '
    f'(set --config.{name}={_flag_value(example)}, for example).'
  )


def check_field(name: str, value) -> None:
  """Raises ValueError (naming the field, the value and what is allowed) if not allowed."""
  field = FIELDS[name]
  if not field.rule.test(value):
    example = field.default if field.example is None else field.example
    raise _problem(name, field.rule.text, value, example)


# ----------------------------------------------------------------------------- shared rules


def check_geometry(isize, nc) -> None:
  """Raises ValueError unless isize is a power of two >= 32 and nc is 1 or 3.

  The one rule of the image geometry, for the networks and the data pipeline alike.
  """
  check_field('isize', isize)
  check_field('nc', nc)


def check_drop_outer_skips(drop_outer_skips, levels: int) -> None:
  """Raises ValueError unless 0 <= drop_outer_skips <= levels - 1 (the U-Net's skips).

  Args:
    drop_outer_skips: outermost skips removed from G.
    levels: the U-Net's levels, log2(isize).
  """
  skips = levels - 1
  if not (_is_int(drop_outer_skips) and 0 <= drop_outer_skips <= skips):
    allowed = (
      f'an integer in [0, {skips}] (the U-Net has {skips} skip connections at isize {2**levels})'
    )
    raise _problem('model.drop_outer_skips', allowed, drop_outer_skips, 0)


def check_model_options(name, ngf, ndf, drop_outer_skips, extra_layers) -> None:
  """Raises ValueError for a model field that the chosen model (config.model.name) lacks.

  Skip-GANomaly has no extra layers; GANomaly's G has no skips to drop, and its D takes
  G's width ngf (the authors build their D from ngf and never read ndf), so ndf must
  equal ngf rather than be silently ignored.
  """
  check_field('model.name', name)
  if name == 'skipganomaly' and extra_layers != 0:
    allowed = "0 when config.model.name is 'skipganomaly' (extra layers are a GANomaly option)"
    raise _problem('model.extra_layers', allowed, extra_layers, 0)
  if name == 'ganomaly' and drop_outer_skips != 0:
    allowed = "0 when config.model.name is 'ganomaly' (its generator has no skips)"
    raise _problem('model.drop_outer_skips', allowed, drop_outer_skips, 0)
  if name == 'ganomaly' and ndf != ngf:
    allowed = (
      f"equal to config.model.ngf ({ngf}) when config.model.name is 'ganomaly' (its "
      "discriminator is as wide as its generator, as in the authors' code)"
    )
    raise _problem('model.ndf', allowed, ndf, ngf)


def d_feature_levels(isize: int) -> int:
  """The discriminator's feature levels at isize (isize/2 down to 4 pixels)."""
  return int(math.log2(isize)) - 2


def check_batch_divisible(batch_size, count: int, field: str = 'batch_size', what='devices'):
  """Raises ValueError unless a global batch splits evenly over `count` devices or processes.

  Args:
    batch_size: the global batch.
    count: the number of devices (or processes) that share it.
    field: the config field of the batch ('batch_size' or 'eval_batch_size').
    what: 'devices' or 'processes', for the message.
  """
  if batch_size % count:
    suggestion = count * max(1, batch_size // count)
    raise ValueError(
      f'config.{field} must be a multiple of the number of {what} ({count}); got '
      f'{batch_size}, which is not divisible by {count} (set --config.{field}={suggestion}, '
      'for example).'
    )


def compute_dtype(name: str):
  """The compute dtype named by config.dtype ('float32' or 'bfloat16')."""
  check_field('dtype', name)
  return jnp.dtype(name)


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
