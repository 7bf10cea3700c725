"""Numeric parity with the authors' PyTorch Skip-GANomaly (tests/data/reference_parity_ngf8.npz).

The fixture holds the official code's numbers for a small model (ngf=ndf=8, nz=10,
isize 32, nc 3, batch 8): its initial weights, outputs at init in eval and train mode,
the losses and gradients of its first step, and its weights and BatchNorm running
statistics after steps 1 and 3 (on x0, x1, x2), all float32, NCHW and torch-named. Its
two forced changes to the published code are ours too: clean inputs (its `self.noise` is
never initialised) and D's gradient restricted to D (torch <= 1.4's result).

We load the initial weights through `torch_weights` and run our own code: the models, the
paper score and the jitted `train_step` (float32, conv_impl 'auto' = the CPU fast conv
path of real training). "Relative" below is max |ours - ref| / max |ref| over an array.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from skipganomaly_jax import torch_weights
from skipganomaly_jax import train_step as ts
from skipganomaly_jax.models import ModelSpec

FIXTURE = pathlib.Path(__file__).resolve().parent / 'data' / 'reference_parity_ngf8.npz'
SPEC = ModelSpec(isize=32, nc=3, ngf=8, ndf=8, nz=10)
# float32 forward passes and running statistics: a few ulps of the data's scale.
FORWARD_RTOL = 1e-5


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


def state_dict(ref, prefix: str, net: str) -> dict:
  start = f'{prefix}/{net}/'
  return {k[len(start) :]: v for k, v in ref.items() if k.startswith(start)}


def variables(ref, prefix: str) -> dict:
  """The fixture's G and D weights at `prefix` ('init', 'step1', ...) as our variables."""
  return torch_weights.convert_state_dicts(
    state_dict(ref, prefix, 'G'), state_dict(ref, prefix, 'D'), SPEC
  )


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def relative(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def tree_relative(ours, theirs) -> dict:
  """{'layer/leaf': relative error} over two nested dicts of the same structure."""
  flat_ours = jax.tree_util.tree_flatten_with_path(ours)[0]
  flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
  return {jax.tree_util.keystr(p): relative(v, flat_theirs[p]) for p, v in flat_ours}


def parity_config():
  config = load_config('default')
  config.model.ngf, config.model.ndf, config.model.nz = SPEC.ngf, SPEC.ndf, SPEC.nz
  return config


@pytest.fixture(scope='module')
def trained(ref):
  """Our real jitted train_step from the fixture's initial weights on x0, x1, x2.

  Returns {'init': (g, d), 'step1': (g, d, metrics), 'step3': (g, d, metrics)}.
  """
  config = parity_config()
  init = variables(ref, 'init')
  g, d = ts.create_train_states(config, jax.random.key(0))
  g = g.replace(params=init['generator']['params'], batch_stats=init['generator']['batch_stats'])
  d = d.replace(
    params=init['discriminator']['params'], batch_stats=init['discriminator']['batch_stats']
  )
  g = g.replace(opt_state=g.tx.init(g.params))
  d = d.replace(opt_state=d.tx.init(d.params))
  step = jax.jit(functools.partial(ts.train_step, config=config))
  out = {'init': (g, d)}
  for i, name in enumerate(('x0', 'x1', 'x2')):
    g, d, metrics = step(g, d, nhwc(ref[name]), jax.random.key(i))
    if i in (0, 2):
      out[f'step{i + 1}'] = (g, d, metrics)
  return out


# ---- BatchNorm running statistics --------------------------------------------------------


@pytest.mark.parametrize('after', ['step1', 'step3'])
def test_running_statistics_equal_reference(ref, trained, after):
  """Both networks' running mean and var after steps 1 and 3 (G: one EMA update per
  step; D: three, as the reference runs D on x, G(x) and G(x) again; unbiased var)."""
  g, d, _ = trained[after]
  expected = variables(ref, after)
  errors = tree_relative(
    {'generator': g.batch_stats, 'discriminator': d.batch_stats},
    {k: expected[k]['batch_stats'] for k in expected},
  )
  assert max(errors.values()) < FORWARD_RTOL, errors


def one_batch_statistics(variables_of_net, model, x, **kwargs):
  return model.apply(variables_of_net, x, train=True, mutable=['batch_stats'], **kwargs)[1]


def test_reference_d_statistics_take_three_updates(ref):
  """Says, from the reference's own numbers, how many EMA updates D's statistics take.

  From the initial weights, D's statistics after step 1 equal x0's update followed by
  G(x0)'s update twice (the reference runs D on G(x) again in D's backward); with one
  update for G(x0) they miss the fixture by far more than the tolerance.
  """
  init = variables(ref, 'init')
  expected = variables(ref, 'step1')['discriminator']['batch_stats']
  x0, d_model = nhwc(ref['x0']), SPEC.discriminator()
  x_hat = SPEC.generator().apply(init['generator'], x0, train=True, mutable=['batch_stats'])[0]
  after_real = one_batch_statistics(init['discriminator'], d_model, x0)['batch_stats']
  d_vars = {'params': init['discriminator']['params'], 'batch_stats': after_real}
  stats = {k: one_batch_statistics(d_vars, d_model, x_hat, stat_updates=k) for k in (1, 2)}
  three = tree_relative(stats[2]['batch_stats'], expected)
  two = tree_relative(stats[1]['batch_stats'], expected)
  assert max(three.values()) < FORWARD_RTOL, three
  assert min(two.values()) > 100 * FORWARD_RTOL, two


def test_reference_running_variance_is_unbiased(ref):
  """Says, from the reference's own numbers, that its running variance is unbiased.

  One step from var = 1 gives r = 0.9 + 0.1 * v, with v the batch variance it stores:
  unbiased, s * n / (n - 1), or biased, s (n = N*H*W). At G's 2x2 layers n = 8 * 2 * 2
  = 32, so the two differ by 1/31 = 3.2% of v. We compare v = (r - 0.9) / 0.1 (float32
  r near 0.9 keeps ~1e-3 of v's digits): ours (unbiased) within 0.5%, the biased
  alternative off by more than 2.5%.
  """
  init = variables(ref, 'init')
  expected = variables(ref, 'step1')['generator']['batch_stats']
  stats = one_batch_statistics(init['generator'], SPEC.generator(), nhwc(ref['x0']))
  n = ref['x0'].shape[0] * 2 * 2
  for layer in ('down_bn_3', 'up_bn_4'):  # The two BatchNorms at 2x2.
    theirs = (np.asarray(expected[layer]['var'], np.float64) - 0.9) / 0.1
    ours = (np.asarray(stats['batch_stats'][layer]['var'], np.float64) - 0.9) / 0.1
    assert relative(ours, theirs) < 5e-3, (layer, relative(ours, theirs))
    assert relative(ours * (n - 1) / n, theirs) > 2.5e-2, layer
