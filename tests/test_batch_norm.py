"""models.BatchNorm: flax's normalisation, PyTorch's running statistics.

(Cross-device statistics, with the global count in the unbiased variance, are checked by
tests/test_multidevice.py: 8 devices with 2 images each must equal 1 device with 16.)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipganomaly_jax.nets.models import BN_EPSILON, BN_MOMENTUM, BatchNorm, bn_scale_init


@pytest.fixture
def x():
  return 2.0 * jax.random.normal(jax.random.key(3), (4, 6, 6, 5)) + 0.5


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_same_variables_and_outputs_as_flax(x, dtype):
  flax_bn = nn.BatchNorm(
    momentum=BN_MOMENTUM, epsilon=BN_EPSILON, scale_init=bn_scale_init, dtype=dtype
  )
  ours = BatchNorm(dtype=dtype)
  theirs_vars = flax_bn.init(jax.random.key(1), x, use_running_average=True)
  our_vars = ours.init(jax.random.key(1), x, train=False)
  # Same names and initial values: checkpoints made with nn.BatchNorm load unchanged.
  jax.tree.map(np.testing.assert_array_equal, our_vars, theirs_vars)
  # Non-trivial running statistics, so eval mode is tested on more than (0, 1).
  stats = {'mean': jnp.linspace(-1.0, 1.0, 5), 'var': jnp.linspace(0.5, 3.0, 5)}
  our_vars = theirs_vars = {**our_vars, 'batch_stats': stats}
  xd = x.astype(dtype)
  y_ours, _ = ours.apply(our_vars, xd, train=True, mutable=['batch_stats'])
  y_theirs, _ = flax_bn.apply(theirs_vars, xd, use_running_average=False, mutable=['batch_stats'])
  assert y_ours.dtype == y_theirs.dtype == dtype
  np.testing.assert_array_equal(y_ours, y_theirs)  # Bit for bit.
  np.testing.assert_array_equal(
    ours.apply(our_vars, xd, train=False),
    flax_bn.apply(theirs_vars, xd, use_running_average=True),
  )


@pytest.mark.parametrize('updates', [1, 2, 3])
def test_running_statistics_are_pytorch_s(x, updates):
  """k EMA updates with torch's momentum and the unbiased batch variance (numpy)."""
  model = BatchNorm()
  variables = model.init(jax.random.key(0), x, train=False)
  start = {'mean': np.linspace(-1.0, 1.0, 5), 'var': np.linspace(0.5, 3.0, 5)}
  variables = {**variables, 'batch_stats': start}
  _, new = model.apply(variables, x, train=True, stat_updates=updates, mutable=['batch_stats'])
  flat = np.asarray(x, np.float64).reshape(-1, 5)
  mean, var = flat.mean(0), flat.var(0, ddof=1)  # torch's running var is unbiased.
  expected_mean, expected_var = start['mean'], start['var']
  for _ in range(updates):
    expected_mean = 0.9 * expected_mean + 0.1 * mean
    expected_var = 0.9 * expected_var + 0.1 * var
  np.testing.assert_allclose(new['batch_stats']['mean'], expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['batch_stats']['var'], expected_var, rtol=1e-5)


def test_eval_mode_leaves_statistics_and_init_does_not_update(x):
  model = BatchNorm()
  variables = model.init(jax.random.key(0), x, train=True)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
  y = model.apply(variables, x, train=False)
  scale = np.asarray(variables['params']['scale'])
  np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(1.0 + BN_EPSILON) * scale, rtol=1e-6)
