"""Device-resident training data (data/device_batches.py) changes nothing in the results:
the same batches as the host TrainIterator (order, epochs, resume, each device's rows)
and the same parameters after training steps; `config.device_data` selects it."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE, ROOT, load_config, run_json, tiny

from skipganomaly_jax import config as config_lib
from skipganomaly_jax import parallel as mesh_lib
from skipganomaly_jax.data import input_pipeline as ip
from skipganomaly_jax.training import training_step


def take(iterator, n):
  return [np.asarray(next(iterator)) for _ in range(n)]


def test_same_batches_as_the_host_iterator_and_resume(rng):
  images = rng.integers(0, 256, (23, 5, 5, 3), dtype=np.uint8)
  mesh = mesh_lib.make_mesh()
  seed = int(rng.integers(1000))
  host = take(ip.TrainIterator(images, 4, seed), 13)  # 5 steps per epoch: 2.6 epochs.
  device_it = ip.DeviceTrainIterator(images, 4, seed, mesh)
  got = take(device_it, 13)
  for g, h in zip(got, host, strict=True):
    assert g.dtype == np.float32 and g.shape == h.shape
    np.testing.assert_array_equal(g, h)  # Bit-exact, the uint8 -> float mapping included.
  # Every uint8 value maps exactly as to_float does.
  values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  all_values = next(ip.DeviceTrainIterator(values, 4, 0, mesh))
  np.testing.assert_array_equal(
    np.sort(np.asarray(all_values).ravel()), ip.to_float(values).ravel()
  )
  # Resume mid-epoch from a state written by either iterator: the same continuation.
  state = {'epoch': 1, 'step_in_epoch': 3}
  assert device_it.get_state() == {'epoch': 2, 'step_in_epoch': 3}
  resumed = ip.DeviceTrainIterator(images, 4, seed, mesh)
  resumed.set_state(state)
  for g, h in zip(take(resumed, 4), host[8:12], strict=True):
    np.testing.assert_array_equal(g, h)


def test_each_device_gets_the_host_paths_rows():
  seed = int(os.environ.get('TEST_SEED') or 3)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_COMPILE)
  env['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=4'
  report = run_json([sys.executable, str(ROOT / 'tests' / 'device_data_check.py'), str(seed)], env)
  assert report['devices'] == 4
  assert report['same_global'] and report['same_shards'] and report['same_as_processes'], report
  assert 'batch' in report['sharding'], report


def test_same_params_after_steps_as_host_batches(rng):
  config = tiny(load_config('default'))
  config.nc, config.batch_size = 1, 8
  images = rng.integers(0, 256, (20, 32, 32, 1), dtype=np.uint8)  # 2 steps per epoch.
  mesh = mesh_lib.make_mesh()
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  step = training_step.make_parallel_train_step(spec, mesh)
  results = []
  for device_data in ('off', 'on'):
    iterator = ip.train_iterator(images, 8, config.seed, mesh, device_data)
    assert isinstance(iterator, ip.DeviceTrainIterator) == (device_data == 'on')
    g, d = mesh_lib.replicate(training_step.create_train_states(spec, jax.random.key(0)), mesh)
    for i in range(5):
      batch = next(iterator)
      if isinstance(batch, np.ndarray):
        batch = mesh_lib.shard_batch(batch, mesh)
      g, d, _ = step(g, d, batch, jax.random.key(i))
    results.append(jax.device_get((g.params, d.params, g.batch_stats, d.batch_stats)))
  for a, b in zip(*map(jax.tree.leaves, results), strict=True):
    np.testing.assert_array_equal(a, b)


class _Device:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_auto_setting_by_size_and_device_memory():
  assert ip.use_device_data('auto', 138 * 2**20, [_Device(None)])  # CIFAR-10 on CPU.
  assert not ip.use_device_data('auto', 2**30 + 1, [_Device(None)])
  assert not ip.use_device_data('auto', 101, [_Device({'bytes_limit': 800})])  # > 1/8.
  assert ip.use_device_data('auto', 100, [_Device({'bytes_limit': 800})])
  assert ip.use_device_data('on', 2**40) and not ip.use_device_data('off', 1)
  with pytest.raises(ValueError, match='device_data must be one of'):
    ip.use_device_data('yes', 1)


def test_config_field_is_checked_and_optional_in_stored_configs():
  config = load_config('default')
  assert config.device_data == 'auto'
  config.device_data = 'gpu'
  with pytest.raises(ValueError, match=r"config.device_data must be one of \('auto'"):
    config_lib.validate(config)
  stored = json.loads(load_config('default').to_json())
  del stored['device_data']  # A checkpoint written before the field existed.
  config_lib.from_stored(stored)
