"""The GANomaly train step: its weights, the shared D re-initialisation guard, bfloat16.

(Its numbers against the authors' code: tests/test_ganomaly_parity.py; 8 devices equal
one: tests/test_multidevice.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.nets.models import reinit_params
from skipganomaly_jax.training import training_step


def ganomaly_config():
  config = load_config('default')
  config.model.name = 'ganomaly'
  config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  return config


def step_spec(config) -> training_step.StepSpec:
  return training_step.StepSpec.from_specs(config_lib.specs(config))


def jitted_step(config):
  spec = step_spec(config)
  return jax.jit(lambda g, d, x, k: training_step.train_step(g, d, x, k, spec=spec))


@pytest.fixture(scope='module')
def batch():
  return np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def states():
  return training_step.create_train_states(step_spec(ganomaly_config()), jax.random.key(2))


def test_losses_are_weighted_by_the_config(states, batch):
  """g_loss = w_adv * adv + w_con * con + w_enc * enc; d_loss = (real + fake) / 2."""
  config = ganomaly_config()
  config.loss.w_adv, config.loss.w_con, config.loss.w_enc = 2.0, 3.0, 5.0
  _, _, m = jitted_step(config)(*states, batch, jax.random.key(0))
  want = 2.0 * m['g_adv'] + 3.0 * m['g_con'] + 5.0 * m['g_enc']
  np.testing.assert_allclose(m['g_loss'], want, rtol=1e-6)
  np.testing.assert_allclose(m['d_loss'], 0.5 * (m['d_real_loss'] + m['d_fake_loss']), rtol=1e-6)
  assert float(m['g_enc']) > 0.0 and 'g_lat' not in m and 'd_lat' not in m


def test_reinit_guard_fires_only_below_threshold(states, batch):
  g0, d0 = states
  key = jax.random.key(7)
  _, d_normal, m_normal = jitted_step(ganomaly_config())(g0, d0, batch, key)
  forced = ganomaly_config()
  forced.loss.d_reinit_threshold = 1e9  # Forces "D loss below the threshold".
  _, d_forced, m_forced = jitted_step(forced)(g0, d0, batch, key)
  assert float(m_normal['d_reinit']) == 0.0 and float(m_forced['d_reinit']) == 1.0
  fresh = reinit_params(d0.params, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), d_forced.params, fresh)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  jax.tree.map(close, d_forced.batch_stats, d_normal.batch_stats)  # Statistics kept.
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), d_normal.params, fresh)
  assert all(jax.tree.leaves(changed))


def test_bfloat16_compute_trains_with_float32_params(states, batch):
  config = ganomaly_config()
  config.dtype = 'bfloat16'
  g, d, m16 = jitted_step(config)(*states, batch, jax.random.key(0))
  _, _, m32 = jitted_step(ganomaly_config())(*states, batch, jax.random.key(0))
  for key in ('g_adv', 'g_con', 'g_enc', 'd_real_loss', 'd_fake_loss'):
    np.testing.assert_allclose(m16[key], m32[key], rtol=5e-2, err_msg=key)
  dtypes = {
    leaf.dtype
    for leaf in jax.tree.leaves((g.params, d.params, g.opt_state, d.batch_stats))
    if hasattr(leaf, 'dtype') and leaf.dtype != jnp.int32
  }
  assert dtypes == {jnp.dtype('float32')}
