"""configs/no_skips.py: the skip-free, latent k-NN option on top of any base config."""

import importlib
import math
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.nets.models import ModelSpec, check_drop_outer_skips
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT))  # configs/ is imported as a package, as main.py does.
no_skips = importlib.import_module('configs.no_skips')

CHANGED = {'model.drop_outer_skips', 'score_kind', 'num_epochs'}


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


@pytest.mark.parametrize('base', ['demo', 'cifar10_arrays', 'textures'])
def test_changes_only_the_option_and_removes_every_skip(base):
  option = no_skips.get_config(base)
  plain = _flat(importlib.import_module(f'configs.{base}').get_config().to_dict())
  changed = {k for k, v in _flat(option.to_dict()).items() if plain[k] != v}
  assert changed <= CHANGED, changed - CHANGED
  assert option.score_kind == 'latent_knn' and option.num_epochs == 5
  levels = int(math.log2(option.isize))
  check_drop_outer_skips(option.model.drop_outer_skips, levels)  # In range...
  with pytest.raises(ValueError):  # ...and the largest value: no skip is left.
    check_drop_outer_skips(option.model.drop_outer_skips + 1, levels)
  config_lib.validate(option)


def test_generator_of_the_option_has_no_skip_inputs():
  config = no_skips.get_config('demo')
  config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  spec = ModelSpec.from_config(config)
  x = jnp.zeros((1, config.isize, config.isize, config.nc))
  key = jax.random.PRNGKey(0)
  # Shapes only (no compile): without a skip an up level's kernel takes only the
  # decoder's channels, which from_variables reads back as "no skip left".
  variables = jax.eval_shape(
    lambda: {
      'generator': spec.generator().init(key, x, train=False),
      'discriminator': spec.discriminator().init(key, x, train=False),
    }
  )
  assert ModelSpec.from_variables(variables).drop_outer_skips == 4


def test_main_flag_takes_the_base_after_a_colon():
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'cfg', flag_values=values)
  values([sys.argv[0], f'--config={ROOT}/configs/no_skips.py:demo'])
  assert holder.value.dataset.name == 'mnist_offline'
  assert holder.value.model.drop_outer_skips == 4


def test_unknown_base_is_named():
  with pytest.raises(ValueError, match="no config named 'nope'"):
    no_skips.get_config('nope')
