"""The comparisons of the parity tests with the authors' PyTorch code, for both models.

tests/test_reference_parity.py (Skip-GANomaly) and tests/test_ganomaly_parity.py
(GANomaly) compare our code with a fixture of the authors' numbers (tests/data, float32,
NCHW, torch-named); tests/test_import_reference.py and tests/test_ganomaly_import.py
import those fixtures' weights. Each test module keeps its own fixture, spec, weight port
and bounds; the reading, running and comparing they share is here. "Relative" is
max |ours - ref| / max |ref| over an array.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import load_config

from skipganomaly_jax import config as config_lib
from skipganomaly_jax.training import training_step


def load_fixture(path) -> dict:
  """A parity fixture (.npz) as {key: numpy array}."""
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def state_dict(ref, prefix: str, net: str) -> dict:
  """The fixture's torch state dict of `net` ('G', 'D') at `prefix` ('init', 'step1', ...)."""
  start = f'{prefix}/{net}/'
  return {k[len(start) :]: v for k, v in ref.items() if k.startswith(start)}


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


def show(errors: dict) -> str:
  """Every entry, untruncated (pytest shortens a non-string assertion message)."""
  return ', '.join(f'{k}: {v:.3g}' for k, v in errors.items())


def parity_config(spec):
  """The default config with the fixture's model (`spec`: name, ngf, ndf, nz)."""
  config = load_config('default')
  config.model.name = spec.name
  config.model.ngf, config.model.ndf, config.model.nz = spec.ngf, spec.ndf, spec.nz
  return config


def import_config(spec, dataset: str = 'mnist_offline'):
  """The offline digits as RGB, with the fixture's model (`spec`); 'missing': no dataset."""
  config = load_config('demo')
  config.model.name = spec.name
  config.nc, config.model.ngf, config.model.ndf, config.model.nz = 3, spec.ngf, spec.ndf, spec.nz
  config.eval_batch_size = 512
  if dataset == 'missing':
    config.dataset.name, config.dataset.root = 'folder', '/nonexistent/skipganomaly_data'
  return config


def run_steps(ref, config, init):
  """Our real jitted train_step from the fixture's initial weights on x0, x1, x2.

  Args:
    ref: the fixture.
    config: the run config (`parity_config`, perhaps broken on purpose).
    init: the fixture's initial weights as our variables ({'generator', 'discriminator'}).

  Returns {'init': (g, d), 'step1': (g, d, metrics), 'step3': (g, d, metrics)}.
  """
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  g, d = training_step.create_train_states(spec, jax.random.key(0))
  g = g.replace(params=init['generator']['params'], batch_stats=init['generator']['batch_stats'])
  d = d.replace(
    params=init['discriminator']['params'], batch_stats=init['discriminator']['batch_stats']
  )
  g = g.replace(opt_state=g.tx.init(g.params))
  d = d.replace(opt_state=d.tx.init(d.params))
  step = jax.jit(functools.partial(training_step.train_step, spec=spec))
  out = {'init': (g, d)}
  for i, name in enumerate(('x0', 'x1', 'x2')):
    g, d, metrics = step(g, d, nhwc(ref[name]), jax.random.key(i))
    if i in (0, 2):
      out[f'step{i + 1}'] = (g, d, metrics)
  return out


def first_step_gradients(state, b1: float):
  """The gradient of a state's first Adam step: its first moment is exactly (1 - b1) * g
  (b1 = 0.5: a multiplication by 0.5, no rounding), so it comes back bit for bit."""
  return jax.tree.map(lambda mu: mu / (1.0 - b1), state.opt_state[0].mu)


def params_report(states, init: dict, expected: dict, lr: float) -> dict:
  """Per network: mean |u - u_ref| and the share of entries with |u - u_ref| > 0.01, for
  u = (param - init) / lr, the update in learning rates; and the reference's mean |u|.

  Args:
    states: our (g, d) train states.
    init, expected: the fixture's initial weights and the ones to compare with, as our
      variables ({'generator', 'discriminator'}).
    lr: the learning rate.
  """
  report = {}
  for key, state in zip(('generator', 'discriminator'), states, strict=True):
    ours = jax.tree.leaves(state.params)
    start = jax.tree.leaves(init[key]['params'])
    theirs = jax.tree.leaves(expected[key]['params'])
    diff = np.concatenate(
      [((np.asarray(o, np.float64) - t) / lr).ravel() for o, t in zip(ours, theirs, strict=True)]
    )
    moved = np.concatenate([((t - s) / lr).ravel() for t, s in zip(theirs, start, strict=True)])
    report[key] = {
      'mean_abs': float(np.mean(np.abs(diff))),
      'share_off': float(np.mean(np.abs(diff) > 0.01)),
      'reference_mean_abs_update': float(np.mean(np.abs(moved))),
    }
  return report


def statistics_errors(g, d, expected: dict) -> dict:
  """Relative errors of both networks' running statistics against `expected` (variables)."""
  return tree_relative(
    {'generator': g.batch_stats, 'discriminator': d.batch_stats},
    {k: expected[k]['batch_stats'] for k in expected},
  )
