"""config.model.name = 'ganomaly': its fields' rules, configs/ganomaly.py, and ModelSpec."""

import importlib
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from conftest import ROOT, load_config
from ml_collections import config_flags

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.nets.ganomaly import GanomalyDiscriminator, GanomalyGenerator
from skipganomaly_jax.nets.models import Discriminator, Generator, ModelSpec

sys.path.insert(0, str(ROOT))  # configs/ is imported as a package, as main.py does.
ganomaly_config = importlib.import_module('configs.ganomaly')


@pytest.mark.parametrize(
  'name, changes, message',
  [
    (
      'skipganomaly',
      {'extra_layers': 1},
      "config.model.extra_layers must be 0 when config.model.name is 'skipganomaly'",
    ),
    (
      'ganomaly',
      {'drop_outer_skips': 1},
      "config.model.drop_outer_skips must be 0 when config.model.name is 'ganomaly'",
    ),
    (
      'ganomaly',
      {'ngf': 32},
      'config.model.ndf must be equal to config.model.ngf (32) when config.model.name is '
      "'ganomaly'",
    ),
  ],
)
def test_a_field_the_model_lacks_is_named(name, changes, message):
  config = load_config('default')
  config.model.name = name
  for key, value in changes.items():
    setattr(config.model, key, value)
  with pytest.raises(ValueError) as info:
    config_lib.validate(config)
  assert str(info.value).startswith(message), str(info.value)
  assert '(set --config.model.' in str(info.value)
  with pytest.raises(ValueError, match='when config.model.name is'):  # Specs built directly.
    config_lib.ModelSettings(name=name, **changes)
  with pytest.raises(ValueError, match='when config.model.name is'):
    ModelSpec(name=name, **changes)


def test_ganomaly_takes_extra_layers_and_the_default_is_skipganomaly():
  config = load_config('default')
  assert config_lib.specs(config).model.name == 'skipganomaly'
  config.model.name, config.model.extra_layers = 'ganomaly', 2
  assert config_lib.specs(config).model.extra_layers == 2
  assert config_lib.specs(config).loss.w_enc == 1.0


@pytest.mark.parametrize('base', ['demo', 'cifar10_arrays', 'textures', 'mvtec'])
def test_the_config_changes_only_the_model(base):
  option = ganomaly_config.get_config(base)
  plain = importlib.import_module(f'configs.{base}').get_config().to_dict()
  got = option.to_dict()
  assert got['model']['name'] == 'ganomaly' and got['model']['ndf'] == got['model']['ngf']
  got['model'] = {k: v for k, v in got['model'].items() if k not in ('name', 'ndf')}
  plain['model'] = {k: v for k, v in plain['model'].items() if k not in ('name', 'ndf')}
  assert got == plain
  config_lib.validate(option)


def test_main_flag_takes_the_base_after_a_colon():
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'cfg', flag_values=values)
  values([sys.argv[0], f'--config={ROOT}/configs/ganomaly.py:demo'])
  assert holder.value.dataset.name == 'mnist_offline' and holder.value.model.name == 'ganomaly'


def test_unknown_base_is_named():
  with pytest.raises(ValueError, match="no config named 'nope'"):
    ganomaly_config.get_config('nope')


@pytest.mark.parametrize(
  'isize, nc, extra_layers', [(32, 1, 0), (32, 3, 2), (64, 3, 1), (128, 1, 0)]
)
def test_spec_builds_the_ganomaly_networks_and_reads_them_back(isize, nc, extra_layers):
  spec = ModelSpec(isize, nc, ngf=6, ndf=6, nz=7, name='ganomaly', extra_layers=extra_layers)
  g, d = spec.generator(), spec.discriminator()
  assert isinstance(g, GanomalyGenerator) and isinstance(d, GanomalyDiscriminator)
  assert (g.ngf, g.nz, g.extra_layers, d.ngf, d.extra_layers) == (
    6,
    7,
    extra_layers,
    6,
    extra_layers,
  )
  x = jnp.zeros((1, isize, isize, nc))
  key = jax.random.key(0)
  variables = jax.eval_shape(  # Shapes only: no compile.
    lambda: {
      'generator': g.init(key, x, train=False),
      'discriminator': d.init(key, x, train=False),
    }
  )
  assert ModelSpec.from_variables(variables) == spec
  assert spec.code_size == 7


def test_skipganomaly_spec_is_unchanged():
  spec = ModelSpec(ngf=8, ndf=8, nz=16)
  assert isinstance(spec.generator(), Generator) and isinstance(spec.discriminator(), Discriminator)
  assert spec.name == 'skipganomaly' and spec.code_size == 64
