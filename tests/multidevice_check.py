"""Runs in a subprocess with N simulated CPU devices (see test_multidevice.py).

Compares the shard_map step over all devices with the plain jitted per-device step on
one device, on the same global batches, with SGD (an update linear in the gradient) and
with Adam, and prints the relative errors after steps 1 and 3 as JSON, for each model
named on the command line (one process for all, paying JAX's start-up once):

    python tests/multidevice_check.py GLOBAL_BATCH SEED [MODEL ...] [--graphs]
      ->  {MODEL: report, ..., 'graphs': graph report}

--graphs also trains Skip-GANomaly's sharded Adam step with config.model.conv_impl='lax'
(the plain `lax` graph that GPUs and TPUs run; on CPU 'auto' runs custom_vjp convs) and
with config.dtype='bfloat16', on the same batches and initial states, and compares each
with the default float32 run (reusing its compiled step and results).
"""

import argparse
import json
import sys

import jax
import numpy as np
import optax

from skipganomaly_jax import config as config_lib
from skipganomaly_jax import parallel as mesh_lib
from skipganomaly_jax.training import training_step

STEPS = 3  # Global batches (= steps) per run; steps 1 and STEPS are compared.


def relative_error(a, b) -> float:
  """||a - b|| / ||b|| over all leaves of two pytrees."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(
    float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    for x, y in zip(la, lb, strict=True)
  )
  den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
  if den == 0.0:  # e.g. SGD's empty optimizer state
    return 0.0 if num == 0.0 else float('inf')
  return float(np.sqrt(num / den))


def compare(one, many, init) -> dict:
  (g1, d1), (gn, dn) = one, many
  return {
    'g_params': relative_error(gn.params, g1.params),
    'g_batch_stats': relative_error(gn.batch_stats, g1.batch_stats),
    'd_params': relative_error(dn.params, d1.params),
    'd_batch_stats': relative_error(dn.batch_stats, d1.batch_stats),
    'g_opt_state': relative_error(gn.opt_state, g1.opt_state),
    'd_opt_state': relative_error(dn.opt_state, d1.opt_state),
    'param_change': relative_error(g1.params, init[0].params),
    'd_param_change': relative_error(d1.params, init[1].params),
  }


def sharded_run(spec, init, batches, mesh) -> list:
  """[(g, d, metrics) on the host after each step] of the shard_map step from `init`."""
  step = training_step.make_parallel_train_step(spec, mesh)
  # replicate() may reuse init's buffers, which the donating parallel step then deletes.
  states, trace = mesh_lib.replicate(init, mesh), []
  for i, x in enumerate(batches):
    *states, metrics = step(*states, mesh_lib.shard_batch(x, mesh), jax.random.key(i))
    trace.append(jax.device_get((*states, metrics)))
  return trace


def run(spec, tx, batches, seed):
  """Steps 1 and 3 on one device (plain jit) and on the mesh (shard_map).

  Returns:
    (errors by step, the initial states, the mesh run's trace: see `sharded_run`).
  """
  init = jax.device_get(training_step.create_train_states(spec, jax.random.key(seed), tx=tx))
  single = jax.jit(lambda g, d, x, k: training_step.train_step(g, d, x, k, spec=spec))
  trace = sharded_run(spec, init, batches, mesh_lib.make_mesh())
  one, out = init, {}
  for i, x in enumerate(batches):
    one = single(*one, x, jax.random.key(i))[:2]
    if i in (0, STEPS - 1):
      out[f'step{i + 1}'] = compare(one, trace[i][:2], init)
  return out, init, trace


def tiny_config(model: str):
  """configs/default.py with a tiny model (ngf=ndf=8, nz=16), 32x32x3."""
  sys.path.insert(0, 'configs')
  import default  # noqa: PLC0415

  config = default.get_config()
  config.model.name = model  # 'skipganomaly' or 'ganomaly': the same step, either model.
  config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  config.nc = 3
  return config


def model_report(batches, seed: int, model: str) -> tuple[dict, tuple]:
  """The relative errors of one model (config.model.name) on the seeded global batches.

  Returns:
    (report, (initial states, trace) of the Adam run on the mesh).
  """
  report = {'num_devices': jax.device_count()}
  # SGD's lr is kept small: with 0.05, GAN dynamics amplified float32 noise to 6e-5 by
  # step 3 on some seeds; at 0.01 the params still move ~3e-3 per step, so a gradient
  # summed over the 8 devices would show as a ~2e-2 error.
  # SGD (linear in the gradient; it checks the mean over devices and the state threading
  # of the shared step) only for Skip-GANomaly: the step's sharding code is the same for
  # both models, and Adam's step-1 moments, exactly (1 - b1) g and (1 - b2) g^2, check
  # GANomaly's gradients (each optimiser's runs compile two programs).
  spec = training_step.StepSpec.from_specs(config_lib.specs(tiny_config(model)))
  optimizers = {'sgd': optax.sgd(0.01), 'adam': training_step.make_optimizer(spec.optim)}
  if model != 'skipganomaly':
    del optimizers['sgd']
  for name, tx in optimizers.items():
    errors, init, trace = run(spec, tx, batches, seed)
    for step, values in errors.items():
      report[f'{name}_{step}'] = values
  return report, (init, trace)


def update_cosine(params, ref_params, init_params) -> float:
  """Cosine between two runs' updates of a network since init (params - init_params)."""
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in tree])
  base = flat(jax.tree.leaves(init_params))
  a, b = flat(jax.tree.leaves(params)) - base, flat(jax.tree.leaves(ref_params)) - base
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def variant_errors(init, ref, trace) -> dict:
  """How a variant's mesh run differs from the reference run, step by step.

  Per step: the relative error of every loss term; of G's and D's params, with the
  reference's own change of the params since init beside it; the cosine between both
  runs' updates since init (params - init) of each network. `finite`: every metric,
  param and running statistic of every step is finite.
  """
  out = {'finite': True}
  for i, ((g, d, m), (g_ref, d_ref, m_ref)) in enumerate(zip(trace, ref, strict=True)):
    leaves = jax.tree.leaves((g.params, d.params, g.batch_stats, d.batch_stats, m))
    out['finite'] &= all(bool(np.all(np.isfinite(np.asarray(x, np.float64)))) for x in leaves)
    terms = {k: relative_error(m[k], m_ref[k]) for k in m_ref if k != 'd_reinit'}
    out[f'step{i + 1}'] = {
      'loss_terms': terms,
      'max_loss_term': max(terms.values()),
      'g_params': relative_error(g.params, g_ref.params),
      'd_params': relative_error(d.params, d_ref.params),
      'g_param_change': relative_error(g_ref.params, init[0].params),
      'd_param_change': relative_error(d_ref.params, init[1].params),
      'g_update_cosine': update_cosine(g.params, g_ref.params, init[0].params),
      'd_update_cosine': update_cosine(d.params, d_ref.params, init[1].params),
      'd_reinit': [float(m['d_reinit']), float(m_ref['d_reinit'])],
    }
  return out


def graph_report(batches, reference) -> dict:
  """Skip-GANomaly's sharded Adam run with conv_impl='lax' and with bfloat16 compute,
  each against `reference` (the default config's run: (init, trace) from model_report)."""
  init, ref = reference
  mesh = mesh_lib.make_mesh()
  report = {'backend': jax.default_backend(), 'num_devices': mesh.size}
  for name, field, value in (('lax', 'model.conv_impl', 'lax'), ('bfloat16', 'dtype', 'bfloat16')):
    config = tiny_config('skipganomaly')
    parent, _, leaf = field.rpartition('.')
    setattr(config.get(parent) if parent else config, leaf, value)
    spec = training_step.StepSpec.from_specs(config_lib.specs(config))
    report[name] = variant_errors(init, ref, sharded_run(spec, init, batches, mesh))
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('global_batch', type=int)
  parser.add_argument('seed', type=int)
  parser.add_argument('models', nargs='*', default=['skipganomaly'])
  parser.add_argument('--graphs', action='store_true', help='add the lax and bfloat16 runs')
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  shape = (args.global_batch, 32, 32, 3)
  batches = [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(STEPS)]
  models = list(dict.fromkeys(args.models + (['skipganomaly'] if args.graphs else [])))
  out, runs = {}, {}
  for model in models:
    out[model], runs[model] = model_report(batches, args.seed, model)
  out = {m: out[m] for m in args.models}
  if args.graphs:
    out['graphs'] = graph_report(batches, runs['skipganomaly'])
  print(json.dumps(out))


if __name__ == '__main__':
  main()
