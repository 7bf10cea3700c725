"""The single-device update step: learning, the D re-initialisation guard, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.nets.models import ModelSpec, reinit_params
from skipganomaly_jax.training import training_step


def step_spec(config) -> training_step.StepSpec:
  """The step spec of a config, checked (as a run builds it)."""
  return training_step.StepSpec.from_specs(config_lib.specs(config))


def jitted_step(config):
  spec = step_spec(config)
  return jax.jit(lambda g, d, x, k: training_step.train_step(g, d, x, k, spec=spec))


def run_steps(config, batch, seed: int, num_steps: int = 8):
  """(g, d, last metrics, G losses) after num_steps jitted steps on one batch."""
  step = jitted_step(config)
  g, d = training_step.create_train_states(step_spec(config), jax.random.key(seed))
  losses = []
  for i in range(num_steps):
    g, d, metrics = step(g, d, batch, jax.random.key(i))
    losses.append(float(metrics['g_loss']))
  return g, d, metrics, losses


@pytest.fixture(scope='module')
def batch():
  return np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)


def reference_losses(config, g_vars, d_vars, x):
  """(L_G(G's params), L_D(D's params)) written out here, each with its own forward pass.

  Independent of train_step and losses.py: BCE from logits as log(1 + e^-z), L1, L2.
  BatchNorm in training mode (batch statistics), as in the step.
  """
  spec = ModelSpec.from_config(config)
  g_model, d_model = spec.generator(), spec.discriminator()
  lc = config.loss
  bce_real = lambda z: jnp.mean(jnp.logaddexp(0.0, -z))  # -log sigmoid(z)
  bce_fake = lambda z: jnp.mean(jnp.logaddexp(0.0, z))  # -log(1 - sigmoid(z))

  def generate(g_params):
    variables = {'params': g_params, 'batch_stats': g_vars['batch_stats']}
    return g_model.apply(variables, x, train=True, mutable=['batch_stats'])[0]

  def discriminate(d_params, images):
    variables = {'params': d_params, 'batch_stats': d_vars['batch_stats']}
    return d_model.apply(variables, images, train=True, mutable=['batch_stats'])[0]

  def loss_g(g_params):
    x_hat = generate(g_params)
    _, f_real = discriminate(d_vars['params'], x)
    fake_logits, f_fake = discriminate(d_vars['params'], x_hat)
    adv, con = bce_real(fake_logits), jnp.mean(jnp.abs(x - x_hat))
    lat = jnp.mean(jnp.square(f_real - f_fake))
    return lc.w_adv * adv + lc.w_con * con + lc.w_lat * lat

  def loss_d(d_params):
    x_hat = jax.lax.stop_gradient(generate(g_vars['params']))
    real_logits, f_real = discriminate(d_params, x)
    fake_logits, f_fake = discriminate(d_params, x_hat)
    lat = jnp.mean(jnp.square(f_real - f_fake))
    loss = bce_real(real_logits) + bce_fake(fake_logits) + lc.w_lat * lat
    return loss, jnp.mean(jax.nn.sigmoid(real_logits))

  return loss_g, loss_d


def test_step_applies_the_gradients_of_each_loss(tiny_config, rng):
  """With SGD(lr=1), params before - params after = the gradient of each network's loss."""
  x = jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  g, d = training_step.create_train_states(step_spec(tiny_config), key, optax.sgd(1.0))
  g_vars = {'params': g.params, 'batch_stats': g.batch_stats}
  d_vars = {'params': d.params, 'batch_stats': d.batch_stats}

  @jax.jit
  def reference(g_vars, d_vars, x):
    loss_g, loss_d = reference_losses(tiny_config, g_vars, d_vars, x)
    g_loss, g_grads = jax.value_and_grad(loss_g)(g_vars['params'])
    (d_loss, d_real), d_grads = jax.value_and_grad(loss_d, has_aux=True)(d_vars['params'])
    return g_loss, g_grads, d_loss, d_real, d_grads

  g_loss, g_grads, d_loss, d_real, d_grads = reference(g_vars, d_vars, x)
  g_new, d_new, m = jitted_step(tiny_config)(g, d, x, jax.random.key(0))
  assert float(m['d_reinit']) == 0.0
  np.testing.assert_allclose(m['g_loss'], g_loss, rtol=1e-5)
  np.testing.assert_allclose(m['d_loss'], d_loss, rtol=1e-5)
  np.testing.assert_allclose(m['d_real'], d_real, rtol=1e-5)
  for before, after, grads in ((g, g_new, g_grads), (d, d_new, d_grads)):
    applied = jax.tree.map(lambda a, b: np.float64(a) - np.float64(b), before.params, after.params)
    flat_applied = dict(jax.tree_util.tree_leaves_with_path(applied))
    for path, want in jax.tree_util.tree_leaves_with_path(grads):
      # Each leaf to 1e-4 of its largest gradient (float32 sums in another order), plus
      # the float32 rounding of param - grad.
      atol = 1e-4 * float(jnp.abs(want).max()) + 1e-7
      np.testing.assert_allclose(
        flat_applied[path], want, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path)
      )


def frozen(state):
  """The state with an optimiser that never changes its params."""
  tx = optax.set_to_zero()
  return state.replace(tx=tx, opt_state=tx.init(state.params))


def test_each_network_learns_its_own_objective(tiny_config, batch):
  """G against a frozen D without the L1 term, and D against a frozen G, lower their loss.

  (With the L1 term, 50 * L1 alone makes G's loss fall: a step that ignored the
  adversarial and latent terms would pass that.)
  """
  config = tiny_config.copy_and_resolve_references()
  config.loss.w_con = 0.0
  step = jitted_step(config)
  g0, d0 = training_step.create_train_states(step_spec(config), jax.random.key(0))
  curves = {}
  for name, (g, d) in {'G': (g0, frozen(d0)), 'D': (frozen(g0), d0)}.items():
    curve = []
    for i in range(8):
      g, d, metrics = step(g, d, batch, jax.random.key(i))
      curve.append(float(metrics['g_loss' if name == 'G' else 'd_loss']))
    curves[name] = curve
  expected = {'g_adv', 'g_con', 'g_lat', 'g_loss', 'd_real_loss', 'd_fake_loss', 'd_lat'}
  expected |= {'d_loss', 'd_real', 'd_fake', 'd_reinit'}
  assert set(metrics) == expected and all(jnp.shape(v) == () for v in metrics.values())
  assert curves['G'][-1] < 0.85 * curves['G'][0], curves
  assert curves['D'][-1] < 0.93 * curves['D'][0], curves


def test_reinit_guard_fires_only_below_threshold(tiny_config, batch):
  g0, d0 = training_step.create_train_states(step_spec(tiny_config), jax.random.key(2))
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
  g0, d0 = training_step.create_train_states(step_spec(tiny_config), jax.random.key(3))
  off = tiny_config.copy_and_resolve_references()
  off.loss.d_latent = False
  _, _, m_on = jitted_step(tiny_config)(g0, d0, batch, jax.random.key(0))
  _, _, m_off = jitted_step(off)(g0, d0, batch, jax.random.key(0))
  np.testing.assert_allclose(m_off['d_loss'], m_on['d_loss'] - m_on['d_lat'], rtol=1e-5)


def test_bfloat16_compute_trains_with_float32_params(tiny_config, batch):
  """One bf16-compute step is close to the float32 step; params and Adam state stay f32."""
  config = tiny_config.copy_and_resolve_references()
  config.dtype = 'bfloat16'
  g0, d0 = training_step.create_train_states(step_spec(config), jax.random.key(4))
  g, d, m16 = jitted_step(config)(g0, d0, batch, jax.random.key(0))
  _, _, m32 = jitted_step(tiny_config)(g0, d0, batch, jax.random.key(0))
  for key in ('g_adv', 'g_con', 'g_lat', 'd_real_loss', 'd_fake_loss', 'd_lat'):
    np.testing.assert_allclose(m16[key], m32[key], rtol=5e-2, err_msg=key)
  dtypes = {
    leaf.dtype
    for leaf in jax.tree.leaves((g.params, d.params, g.opt_state))
    if hasattr(leaf, 'dtype') and leaf.dtype != jnp.int32
  }
  assert dtypes == {jnp.dtype('float32')}


def test_bad_dtype_is_rejected(tiny_config):
  tiny_config.dtype = 'float16'
  with pytest.raises(ValueError, match="config.dtype must be one of \\('float32', 'bfloat16'\\)"):
    config_lib.compute_dtype(tiny_config.dtype)
