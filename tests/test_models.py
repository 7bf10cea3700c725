"""Shapes, exact parameter counts, initialisation and argument checks of G and D."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipganomaly_jax.nets.models import ModelSpec, reinit_params


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_variables(spec: ModelSpec):
  x = jnp.zeros((1, spec.isize, spec.isize, spec.nc))
  g = jax.eval_shape(lambda: spec.generator().init(jax.random.key(0), x, train=False))
  d = jax.eval_shape(lambda: spec.discriminator().init(jax.random.key(0), x, train=False))
  return g, d


@pytest.mark.parametrize(
  'isize,nc,g_count,d_count',
  [
    (32, 3, 16_659_075, 1_069_700),
    (32, 1, 16_652_929, 1_067_652),
    (64, 3, 29_244_035, 3_577_476),
  ],
)
def test_parameter_counts_equal_reference(isize, nc, g_count, d_count):
  g, d = abstract_variables(ModelSpec(isize=isize, nc=nc))
  assert count(g['params']) == g_count
  assert count(d['params']) == d_count


@pytest.mark.parametrize('isize', [32, 64])
@pytest.mark.parametrize('nc', [1, 3])
def test_output_shapes_and_range(isize, nc):
  spec = ModelSpec(isize=isize, nc=nc, ngf=4, ndf=4, nz=7)
  x = jax.random.uniform(jax.random.key(isize + nc), (3, isize, isize, nc), minval=-1, maxval=1)
  g_vars = spec.generator().init(jax.random.key(1), x, train=False)
  d_vars = spec.discriminator().init(jax.random.key(2), x, train=False)
  # The last layer's output moved and spread (bias 1.5, kernel x 1000), so that it spans
  # values where tanh differs from the identity, a clip or a sigmoid.
  big = jax.tree.map(lambda a: a, g_vars)
  big['params']['up_0']['kernel'] = 1000.0 * g_vars['params']['up_0']['kernel']
  big['params']['up_0']['bias'] = jnp.full((nc,), 1.5)
  last_layer = lambda module, method: module.name == 'up_0'
  for train in (False, True):
    out, state = spec.generator().apply(
      big,
      x,
      train=train,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=last_layer,
    )
    assert out.shape == x.shape
    pre = np.asarray(state['intermediates']['up_0']['__call__'][0], np.float64)
    assert pre.min() < 0.5 and pre.max() > 2.5, (pre.min(), pre.max())
    np.testing.assert_allclose(out, np.tanh(pre), atol=1e-6)  # The output is tanh(up_0).
    (logits, feats), _ = spec.discriminator().apply(d_vars, x, train=train, mutable=['batch_stats'])
    assert logits.shape == (3,) and feats.shape == (3, 7)
  assert ModelSpec.from_variables({'generator': g_vars, 'discriminator': d_vars}) == spec


def test_train_flag_switches_batch_norm():
  spec = ModelSpec(isize=32, nc=1, ngf=4, ndf=4, nz=5)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 1))
  g_vars = spec.generator().init(jax.random.key(1), x, train=False)
  eval_a = spec.generator().apply(g_vars, x, train=False)
  eval_b = spec.generator().apply(g_vars, x[:1], train=False)
  # Eval mode: an image's output does not depend on the rest of its batch.
  np.testing.assert_allclose(eval_a[:1], eval_b, atol=1e-5)
  train_a, _ = spec.generator().apply(g_vars, x, train=True, mutable=['batch_stats'])
  train_b, _ = spec.generator().apply(g_vars, x[:2], train=True, mutable=['batch_stats'])
  assert float(jnp.max(jnp.abs(train_a[:1] - train_b[:1]))) > 1e-4


def test_initialisation_statistics():
  spec = ModelSpec(isize=32, nc=3)
  x = jnp.zeros((1, 32, 32, 3))
  d = spec.discriminator().init(jax.random.key(0), x, train=False)['params']
  kernel = np.asarray(d['conv_1']['kernel'])
  assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.02) < 1e-3
  scale = np.asarray(d['bn_2']['scale'])
  assert abs(scale.mean() - 1.0) < 0.01 and abs(scale.std() - 0.02) < 0.01
  np.testing.assert_array_equal(d['bn_2']['bias'], 0.0)
  fresh = reinit_params(d, jax.random.key(5))
  assert jax.tree.structure(fresh) == jax.tree.structure(d)
  new_kernel = np.asarray(fresh['conv_1']['kernel'])
  assert abs(new_kernel.std() - 0.02) < 1e-3 and not np.allclose(new_kernel, kernel)


@pytest.mark.parametrize('isize', [16, 48, 100, 0])
def test_bad_isize_rejected(isize):
  with pytest.raises(ValueError, match='power of two >= 32'):
    ModelSpec(isize=isize, nc=3)


@pytest.mark.parametrize('nc', [0, 2, 4])
def test_bad_nc_rejected(nc):
  with pytest.raises(ValueError, match='must be 1 or 3'):
    ModelSpec(isize=32, nc=nc)


@pytest.mark.parametrize('drop', [0, 1, 2, 4])
def test_drop_outer_skips_removes_exactly_those_inputs(drop):
  # Removing the skip at level i takes its widths[i] input channels away from the
  # transposed conv up_i (4x4 kernel, out = widths[i-1], or nc at level 0).
  widths, nc = [64, 128, 256, 512, 512], 1
  removed = sum(16 * widths[i] * (widths[i - 1] if i else nc) for i in range(drop))
  spec = ModelSpec(isize=32, nc=nc, drop_outer_skips=drop)
  g, d = abstract_variables(spec)
  assert count(g['params']) == 16_652_929 - removed
  assert ModelSpec.from_variables({'generator': g, 'discriminator': d}) == spec


def test_drop_outer_skips_out_of_range_rejected():
  with pytest.raises(ValueError, match=r'drop_outer_skips must be an integer in \[0, 4\]'):
    ModelSpec(isize=32, nc=1, drop_outer_skips=5)
