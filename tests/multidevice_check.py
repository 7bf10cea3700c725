"""Runs in a subprocess with N simulated CPU devices (see test_multidevice.py).

Compares the shard_map step over all devices with the plain jitted per-device step on
one device, on the same global batches, with SGD (an update linear in the gradient) and
with Adam, and prints the relative errors after steps 1 and 3 as JSON, for each model
named on the command line (one process for all, paying JAX's start-up once):

    python tests/multidevice_check.py GLOBAL_BATCH SEED [MODEL ...]  ->  {MODEL: report}
"""

import json
import sys

import jax
import numpy as np
import optax

from skipganomaly_jax import config as config_lib
from skipganomaly_jax import parallel as mesh_lib
from skipganomaly_jax.training import training_step


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


def run(spec, tx, batches, seed):
  """Steps 1 and 3 on one device (plain jit) and on the mesh (shard_map)."""
  init = training_step.create_train_states(spec, jax.random.key(seed), tx=tx)
  single = jax.jit(lambda g, d, x, k: training_step.train_step(g, d, x, k, spec=spec))
  mesh = mesh_lib.make_mesh()
  parallel = training_step.make_parallel_train_step(spec, mesh)
  # replicate() may reuse init's buffers, which the donating parallel step then deletes.
  one, many = init, mesh_lib.replicate(init, mesh)
  init = jax.device_get(init)
  out = {}
  for i, x in enumerate(batches):
    one = single(*one, x, jax.random.key(i))[:2]
    many = parallel(*many, mesh_lib.shard_batch(x, mesh), jax.random.key(i))[:2]
    if i in (0, 2):
      out[f'step{i + 1}'] = compare(one, many, init)
  return out


def model_report(global_batch: int, seed: int, model: str) -> dict:
  """The relative errors of one model (config.model.name) on 3 seeded global batches."""
  sys.path.insert(0, 'configs')
  import default  # noqa: PLC0415

  config = default.get_config()
  config.model.name = model  # 'skipganomaly' or 'ganomaly': the same step, either model.
  config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  config.nc = 3
  rng = np.random.default_rng(seed)
  batches = [rng.uniform(-1, 1, (global_batch, 32, 32, 3)).astype(np.float32) for _ in range(3)]
  report = {'num_devices': jax.device_count()}
  # SGD's lr is kept small: with 0.05, GAN dynamics amplified float32 noise to 6e-5 by
  # step 3 on some seeds; at 0.01 the params still move ~3e-3 per step, so a gradient
  # summed over the 8 devices would show as a ~2e-2 error.
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  for name, tx in (('sgd', optax.sgd(0.01)), ('adam', training_step.make_optimizer(spec.optim))):
    for step, errors in run(spec, tx, batches, seed).items():
      report[f'{name}_{step}'] = errors
  return report


def main(global_batch: int, seed: int, *models: str) -> None:
  models = models or ('skipganomaly',)
  print(json.dumps({model: model_report(global_batch, seed, model) for model in models}))


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
