"""The single-device update step: learning, the D re-initialisation guard, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipganomaly_jax import run_config, training_step
from skipganomaly_jax.models import reinit_params


def jitted_step(config):
  return jax.jit(lambda g, d, x, k: training_step.train_step(g, d, x, k, config=config))


def run_steps(config, batch, seed: int, num_steps: int = 8):
  """(g, d, last metrics, G losses) after num_steps jitted steps on one batch."""
  step = jitted_step(config)
  g, d = training_step.create_train_states(config, jax.random.key(seed))
  losses = []
  for i in range(num_steps):
    g, d, metrics = step(g, d, batch, jax.random.key(i))
    losses.append(float(metrics['g_loss']))
  return g, d, metrics, losses


@pytest.fixture(scope='module')
def batch():
  return np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)


def test_few_steps_reduce_generator_loss(tiny_config, batch):
  g, d, metrics, losses = run_steps(tiny_config, batch, seed=0)
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.2, losses
  assert int(g.step) == 8 and int(d.step) == 8
  expected = {
    'g_adv',
    'g_con',
    'g_lat',
    'g_loss',
    'd_real_loss',
    'd_fake_loss',
    'd_lat',
    'd_loss',
    'd_real',
    'd_fake',
    'd_reinit',
  }
  assert set(metrics) == expected
  assert all(jnp.shape(v) == () for v in metrics.values())


def test_metrics_are_the_weighted_terms(tiny_config, batch):
  g, d = training_step.create_train_states(tiny_config, jax.random.key(1))
  _, _, m = jitted_step(tiny_config)(g, d, batch, jax.random.key(0))
  lc = tiny_config.loss
  np.testing.assert_allclose(
    m['g_loss'], lc.w_adv * m['g_adv'] + lc.w_con * m['g_con'] + lc.w_lat * m['g_lat'], rtol=1e-5
  )
  np.testing.assert_allclose(
    m['d_loss'], m['d_real_loss'] + m['d_fake_loss'] + lc.w_lat * m['d_lat'], rtol=1e-5
  )
  assert 0 < float(m['d_real']) < 1 and 0 < float(m['d_fake']) < 1
  np.testing.assert_allclose(m['g_lat'], m['d_lat'])


def test_reinit_guard_fires_only_below_threshold(tiny_config, batch):
  g0, d0 = training_step.create_train_states(tiny_config, jax.random.key(2))
  key = jax.random.key(7)
  normal_cfg = tiny_config.copy_and_resolve_references()
  _, d_normal, m_normal = jitted_step(normal_cfg)(g0, d0, batch, key)
  forced_cfg = tiny_config.copy_and_resolve_references()
  forced_cfg.loss.d_reinit_threshold = 1e9  # Forces "D loss below the threshold".
  g_forced, d_forced, m_forced = jitted_step(forced_cfg)(g0, d0, batch, key)
  assert float(m_normal['d_reinit']) == 0.0 and float(m_forced['d_reinit']) == 1.0
  # Fired: D's weights are fresh draws from the init distributions...
  fresh = reinit_params(d0.params, key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), d_forced.params, fresh)
  # ...while running statistics, Adam state and the generator update are kept.
  # (Two separately compiled programs may sum in another order: allclose, not equal.)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  jax.tree.map(close, d_forced.batch_stats, d_normal.batch_stats)
  jax.tree.map(close, d_forced.opt_state, d_normal.opt_state)
  # Not fired: D's params are the optimiser's update, not the fresh draw.
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), d_normal.params, fresh)
  assert all(jax.tree.leaves(changed))


def test_discriminator_latent_switch(tiny_config, batch):
  g0, d0 = training_step.create_train_states(tiny_config, jax.random.key(3))
  off = tiny_config.copy_and_resolve_references()
  off.loss.d_latent = False
  _, _, m_on = jitted_step(tiny_config)(g0, d0, batch, jax.random.key(0))
  _, _, m_off = jitted_step(off)(g0, d0, batch, jax.random.key(0))
  np.testing.assert_allclose(m_off['d_loss'], m_on['d_loss'] - m_on['d_lat'], rtol=1e-5)


def test_bfloat16_compute_trains_with_float32_params(tiny_config, batch):
  config = tiny_config.copy_and_resolve_references()
  config.dtype = 'bfloat16'
  g, d, _, losses = run_steps(config, batch, seed=4)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.2, losses
  dtypes = {
    leaf.dtype
    for leaf in jax.tree.leaves((g.params, d.params, g.opt_state))
    if hasattr(leaf, 'dtype') and leaf.dtype != jnp.int32
  }
  assert dtypes == {jnp.dtype('float32')}


def test_bad_dtype_is_rejected(tiny_config):
  tiny_config.dtype = 'float16'
  with pytest.raises(ValueError, match="config.dtype must be one of \\('float32', 'bfloat16'\\)"):
    run_config.compute_dtype(tiny_config)
