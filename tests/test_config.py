"""Every config field is checked, in one place, before anything runs (skipganomaly_jax.config).

One row per field of configs/default.py: a bad value and the words its message must
have. Every message names the field, the value and what is allowed, and gives a value
to set; the test also asserts that the table covers every field.
"""

import ast
import copy
import json
import pathlib

import numpy as np
import pytest
from conftest import ROOT, load_config

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.data import input_pipeline
from skipganomaly_jax.data.batches import TrainIterator
from skipganomaly_jax.nets.models import ModelSpec
from skipganomaly_jax.scoring.evaluation import DatasetScorer
from skipganomaly_jax.training import train

OLD_RUN = pathlib.Path(__file__).resolve().parent / 'data' / 'old_layout_run'

# field, a bad value, the words of the message (after 'config.<field> must be ').
ROWS = [
  ('seed', -1, 'an integer >= 0'),
  ('isize', 48, 'a power of two >= 32'),
  ('nc', 2, '1 or 3 (grayscale or RGB)'),
  ('dataset.name', '', 'a non-empty string'),
  ('dataset.data_dir', 3, 'a string'),
  ('dataset.root', None, 'a string'),
  ('dataset.path', 1.5, 'a string'),
  ('dataset.category', ['carpet'], 'a string'),
  ('dataset.abnormal_class', ' ', 'a class index or name'),
  ('dataset.protocol', 'one-class', "one of ('one_class', 'ganomaly')"),
  ('dataset.seed', 1.5, 'an integer >= 0'),
  ('dataset.val_fraction', 0.0, 'a number in (0, 1)'),
  ('model.name', 'GANomaly', "one of ('skipganomaly', 'ganomaly')"),
  ('model.ngf', 0, 'an integer >= 1'),
  ('model.ndf', -8, 'an integer >= 1'),
  ('model.nz', 16.0, 'an integer >= 1'),
  ('model.drop_outer_skips', 5, 'an integer in [0, 4] (the U-Net has 4 skip connections'),
  ('model.extra_layers', -1, 'an integer >= 0 (GANomaly only'),
  ('model.conv_impl', 'cudnn', "one of ('auto', 'lax', 'fast')"),
  ('dtype', 'float16', "one of ('float32', 'bfloat16')"),
  ('loss.w_adv', -1.0, 'a finite number >= 0'),
  ('loss.w_con', float('nan'), 'a finite number >= 0'),
  ('loss.w_lat', 'one', 'a finite number >= 0'),
  ('loss.w_enc', -2.0, 'a finite number >= 0'),
  ('loss.d_latent', 1, 'True or False'),
  ('loss.d_reinit_threshold', -1e-5, 'a finite number >= 0'),
  ('optim.lr', -1.0, 'a finite number > 0'),
  ('optim.b1', 1.0, 'a number in [0, 1)'),
  ('optim.b2', -0.1, 'a number in [0, 1)'),
  ('batch_size', 0, 'an integer >= 1'),
  ('eval_batch_size', 12.5, 'an integer >= 1'),
  ('num_epochs', 0, 'an integer >= 1'),
  ('max_steps_per_epoch', -1, 'an integer >= 0'),
  ('log_every_steps', 0, 'an integer >= 1'),
  ('device_data', 'gpu', "one of ('auto', 'on', 'off')"),
  ('score_kind', 'knn', "one of ('latent_knn', 'paper', 'map_max', 'map_topk')"),
  ('knn_bank_size', 4, 'an integer >= 5'),
  ('score_lambda', 1.5, 'a number in [0, 1]'),
  ('threshold_percentile', 101.0, 'a number in [0, 100]'),
  ('keep_checkpoints', 0, 'an integer >= 1'),
  ('eval_protocol', 'referenc', "one of ('ours', 'reference')"),
  ('localisation.map', 'd', "one of ('rec', 'rec+d')"),
  ('localisation.d_weight', -1.0, 'a finite number >= 0'),
  ('localisation.d_levels', 4, 'an integer in [1, 3] (the discriminator has 3 feature levels'),
  ('localisation.sigma', float('inf'), 'a finite number >= 0'),
  ('localisation.topk_fraction', 0.0, 'a number in (0, 1]'),
  ('localisation.num_overlays', 0, 'an integer >= 1'),
]


def flat(tree, prefix=''):
  """{dotted name: value} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def with_value(field: str, value) -> dict:
  """configs/default.py as a nested dict (as a stored config is) with one field changed."""
  tree = load_config('default').to_dict()
  *parents, leaf = field.split('.')
  node = tree
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  return tree


def test_the_table_covers_every_field_of_the_default_config():
  default = flat(load_config('default').to_dict())
  names = [row[0] for row in ROWS]
  assert len(names) == len(set(names)) and set(names) == set(default)  # Each field, once.
  assert set(config_lib.FIELDS) == set(default)
  # The table's defaults are configs/default.py's (they fill in absent stored fields).
  assert {k: f.default for k, f in config_lib.FIELDS.items()} == default


@pytest.mark.parametrize('field, bad, words', ROWS, ids=[row[0] for row in ROWS])
def test_a_bad_value_is_named_with_what_is_allowed(field, bad, words):
  with pytest.raises(ValueError) as info:
    config_lib.validate(with_value(field, bad))
  message = str(info.value)
  assert message.startswith(f'config.{field} must be {words}'), message
  assert f'got {bad!r}' in message and f'(set --config.{field}=' in message, message
  config_lib.validate(with_value(field, config_lib.FIELDS[field].default))  # The default: fine.


def test_the_example_of_a_message_is_allowed():
  for field, bad, _ in ROWS:
    with pytest.raises(ValueError) as info:
      config_lib.validate(with_value(field, bad))
    example = str(info.value).split(f'--config.{field}=')[1].split(', for example')[0]
    value = config_lib.FIELDS[field].default
    if not isinstance(value, str):
      value = type(value)(example)
    elif example != "''":
      value = example
    config_lib.validate(with_value(field, value))


def test_a_spec_built_directly_is_checked_the_same_way():
  with pytest.raises(ValueError, match=r'config\.optim\.lr must be a finite number > 0; got -1'):
    config_lib.OptimSpec(lr=-1.0)
  with pytest.raises(ValueError, match=r'config\.dataset\.val_fraction must be a number in'):
    config_lib.DataSpec(val_fraction=1.0)
  with pytest.raises(ValueError, match=r'config\.model\.drop_outer_skips must be .* \[0, 5\]'):
    config_lib.ModelSettings(isize=64, drop_outer_skips=6)


def test_an_unknown_field_is_named_with_the_closest_one():
  config = load_config('default')
  config.optim.lrr = 0.1
  with pytest.raises(ValueError, match=r'config\.optim\.lrr is not a config field .*optim\.lr\?'):
    config_lib.validate(config)
  config = load_config('default')
  config.protocol = 'ours'  # The old name of eval_protocol.
  with pytest.raises(ValueError, match='renamed config.eval_protocol'):
    config_lib.validate(config)


@pytest.mark.parametrize('field', ['batch_size', 'eval_batch_size'])
def test_both_batches_must_split_over_the_devices(field):
  config = load_config('default')
  config.batch_size, config.eval_batch_size = 63, 63
  setattr(config, 'batch_size' if field == 'eval_batch_size' else 'eval_batch_size', 42)
  with pytest.raises(ValueError) as info:
    config_lib.validate(config, devices=2)
  assert str(info.value) == (
    f'config.{field} must be a multiple of the number of devices (2); got 63, which is '
    f'not divisible by 2 (set --config.{field}=62, for example).'
  )
  config_lib.validate(config, devices=3)


def test_the_batch_rule_is_the_same_in_the_data_pipeline_and_the_scorer():
  with pytest.raises(
    ValueError, match=r'config\.batch_size must be a multiple of .*processes \(4\)'
  ):
    TrainIterator(np.zeros((20, 1, 1, 1), np.uint8), 10, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r'eval_batch_size must be a multiple of .*processes \(3\)'):
    input_pipeline.eval_batches(np.zeros((4, 1, 1, 1), np.uint8), 7, 0, 3)

  class Mesh:  # Only its size is read before the check.
    size = 3

  with pytest.raises(ValueError, match=r'config\.eval_batch_size must be a multiple .*\(3\)'):
    DatasetScorer(ModelSpec(), Mesh(), 64, 0.9)


@pytest.mark.parametrize('isize, nc', [(48, 3), (16, 1), (32, 2)])
def test_one_geometry_rule_for_networks_and_data(tmp_path, isize, nc):
  messages = []
  for make in (
    lambda: ModelSpec(isize=isize, nc=nc),
    lambda: input_pipeline.load_images(str(tmp_path), isize, nc),
    lambda: config_lib.DataSpec(isize=isize, nc=nc),
  ):
    with pytest.raises(ValueError) as info:
      make()
    messages.append(str(info.value))
  assert len(set(messages)) == 1, messages


def _config_files():
  names = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')
  return [n for n in names if n != 'no_skips'] + ['no_skips:demo', 'no_skips:textures']


@pytest.mark.parametrize('name', _config_files())
def test_every_config_validates(name):
  if name.startswith('no_skips:'):
    from configs import no_skips  # noqa: PLC0415

    config = no_skips.get_config(name.split(':')[1])
  else:
    config = load_config(name)
  specs = config_lib.specs(config)
  assert specs.model.isize == config.isize and specs.score.kind == config.score_kind


def test_the_default_specs_are_the_default_config():
  assert config_lib.specs(load_config('default')) == config_lib.RunSpecs()


def stored_config_of_the_old_run() -> dict:
  meta = json.loads((OLD_RUN / 'checkpoints' / '2' / 'meta' / 'metadata').read_text())
  return meta['config']


def test_the_stored_config_of_an_old_run_loads():
  stored = stored_config_of_the_old_run()
  config = config_lib.from_stored(stored)
  added = {
    'model.name': 'skipganomaly',
    'model.extra_layers': 0,
    'model.conv_impl': 'auto',
    'loss.w_enc': 1.0,
  }
  assert not set(added) & set(flat(stored))  # Fields added since that run: their defaults.
  assert flat(config.to_dict()) == {**flat(stored), **added}
  specs = config_lib.specs(config)
  assert specs.model == config_lib.ModelSettings(isize=32, nc=1, ngf=4, ndf=4, nz=8)
  assert specs.score.kind == 'latent_knn' and specs.score.knn_bank_size == 64


def test_a_stored_config_without_newer_fields_takes_their_defaults():
  stored = copy.deepcopy(stored_config_of_the_old_run())
  stored['protocol'] = stored.pop('eval_protocol')  # Its old name.
  del stored['localisation'], stored['device_data'], stored['model']['drop_outer_skips']
  del stored['dataset']['category']
  config = config_lib.from_stored(stored)
  assert config.eval_protocol == 'ours' and 'protocol' not in config
  assert config.localisation.to_dict() == load_config('default').localisation.to_dict()
  assert config.device_data == 'auto' and config.model.drop_outer_skips == 0
  assert config.dataset.category == ''


def test_a_stored_config_with_a_bad_value_is_refused():
  stored = stored_config_of_the_old_run()
  stored['knn_bank_size'] = 3
  with pytest.raises(ValueError, match=r'config\.knn_bank_size must be an integer >= 5; got 3'):
    config_lib.from_stored(stored)


@pytest.mark.parametrize(
  'field, value',
  [('optim.lr', 0.0), ('threshold_percentile', 150.0), ('knn_bank_size', 2), ('num_epochs', 0)],
)
def test_training_refuses_a_bad_field_before_anything_runs(tmp_path, monkeypatch, field, value):
  def no_data(*args):
    raise AssertionError('the data was read before the config was checked')

  monkeypatch.setattr(input_pipeline, 'load_splits', no_data)
  config = load_config('demo')
  parent, _, leaf = field.rpartition('.')
  setattr(config.get(parent) if parent else config, leaf, value)
  with pytest.raises(ValueError, match=rf'config\.{field} must be'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_conv_impl_reaches_the_networks_and_is_checked_on_direct_use():
  config = load_config('default')
  config.model.conv_impl = 'lax'
  spec = ModelSpec.from_settings(config_lib.specs(config).model)
  assert spec.conv_impl == 'lax' and spec.generator().conv_impl == 'lax'
  assert spec.discriminator().conv_impl == 'lax'
  assert ModelSpec.from_settings(config_lib.specs(config).model, 'fast').conv_impl == 'fast'
  for make in (lambda: ModelSpec(conv_impl='cuda'), lambda: config_lib.ModelSettings(conv_impl='')):
    with pytest.raises(ValueError, match=r"config\.model\.conv_impl must be one of \('auto'"):
      make()


def test_compute_dtype():
  assert config_lib.compute_dtype('bfloat16').name == 'bfloat16'
  with pytest.raises(ValueError, match=r"config\.dtype must be one of \('float32', 'bfloat16'\)"):
    config_lib.compute_dtype('float16')


# The top: the modules that read a config (a run's, or one stored with a checkpoint).
TOP = {'training/train.py', 'deploy/trained_run.py', 'deploy/import_reference.py'}


def test_the_config_stops_at_the_top():
  """Below the top no function takes a `config`: the layers take specs (ModelSpec's
  `from_config` is a convenience for the top, through `config.specs`)."""
  package = ROOT / 'skipganomaly_jax'
  takers = []
  for path in sorted(package.glob('*/*.py')):
    name = str(path.relative_to(package))
    if name in TOP or name.startswith('config/'):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        if any(a.arg in ('config', 'cfg') for a in args):
          takers.append(f'{name}:{node.lineno} {node.name}')
  assert [t.split(':')[0] + ' ' + t.split(' ')[1] for t in takers] == [
    'nets/models.py from_config'
  ], takers
