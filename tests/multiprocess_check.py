"""One process of a data-parallel run on CPU devices (started by test_multiprocess.py).

    python tests/multiprocess_check.py WORKDIR OUT_DIR NUM_PROCESSES PROCESS_ID DEVICES PORT DIGITS

Sets DEVICES CPU devices for this process, joins a `jax.distributed` job of
NUM_PROCESSES processes on 127.0.0.1:PORT (if NUM_PROCESSES > 1; CPU collectives over
gloo, JAX's default), then runs the product path:

1. `train.train_and_evaluate` on the test session's 500 offline digits (the .npz at
   DIGITS, conftest.digits_npz) with a tiny model, 1 epoch of 2 steps: sharded steps,
   evaluation (DatasetScorer over 18 validation and 140 test images, neither a multiple
   of the evaluation batch of 16), an Orbax checkpoint saved by all processes, outputs
   written by process 0;
2. restores that checkpoint in all processes together (`train.setup` +
   `train.restore_or_init`, the resume path) and scores both sets again;
3. writes OUT_DIR/process_<PROCESS_ID>.npz: the restored states' leaves and the scores.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

import jax  # noqa: E402
import numpy as np  # noqa: E402

STEPS, EVAL_BATCH = 2, 16


def allow_cache_writes_from_every_process() -> None:
  """Lets processes other than 0 write the persistent compilation cache (tests only).

  JAX writes cache entries only from process 0, and on CPU the other processes' keys
  differ (their compile options name their process), so without this process 1 would
  recompile everything in every test ctx. Their keys are distinct, so there is no write
  contention. Best effort: JAX internals; if they changed, runs are just slower.
  """
  from jax._src import compiler, distributed  # noqa: PLC0415

  write = getattr(compiler, '_cache_write', None)
  if write is None or not hasattr(distributed.global_state, 'process_id'):
    return

  def write_as_process_0(*args, **kwargs):
    process_id = distributed.global_state.process_id
    distributed.global_state.process_id = 0
    try:
      return write(*args, **kwargs)
    finally:
      distributed.global_state.process_id = process_id

  compiler._cache_write = write_as_process_0


def make_config(digits: str):
  """configs/demo.py with the tiny test model and latent k-NN score, 1 epoch of STEPS steps,
  on the digits .npz at `digits`."""
  from conftest import digits_config  # noqa: PLC0415

  config = digits_config(digits)
  config.score_kind = 'latent_knn'  # Its bank is built, stored and restored on every process.
  config.num_epochs, config.max_steps_per_epoch = 1, STEPS
  config.log_every_steps, config.eval_batch_size = 1, EVAL_BATCH
  return config


def flat_leaves(prefix: str, tree) -> dict:
  """{prefix/key/path: numpy array} of a pytree (host copies of replicated arrays)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def restore_and_score(config, workdir: str) -> dict:
  """Restores the latest checkpoint in all processes, scores val and test again."""
  from skipganomaly_jax.scoring.scores import scoring_variables  # noqa: PLC0415
  from skipganomaly_jax.training import train  # noqa: PLC0415

  ctx = train.setup(config, workdir)
  try:
    (g, d), knn_bank, meta = train.restore_or_init(ctx)
    assert knn_bank is not None, 'the latent k-NN score stores its bank'
    variables = scoring_variables(g, d, knn_bank)
    out = {
      **flat_leaves('g', g),
      **flat_leaves('d', d),
      **{
        f'{name}_{key}s': value
        for name, images in (('val', ctx.splits.val), ('test', ctx.splits.test))
        for key, value in ctx.scorer(variables, images).items()
      },
      'step': np.asarray(jax.device_get(g.step)),
      'iterator_epoch': np.asarray(meta['data_iterator']['epoch']),
    }
  finally:
    ctx.checkpointer.close()
    ctx.writer.close()
  return out


def main(
  workdir: str,
  out_dir: str,
  num_processes: int,
  process_id: int,
  devices: int,
  port: int,
  digits: str,
) -> None:
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', devices)
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  if num_processes > 1:
    allow_cache_writes_from_every_process()
    jax.distributed.initialize(
      f'127.0.0.1:{port}', num_processes, process_id, initialization_timeout=120
    )
  assert jax.process_count() == num_processes and jax.process_index() == process_id
  assert jax.device_count() == num_processes * devices

  from skipganomaly_jax.training import train  # noqa: PLC0415

  config = make_config(digits)
  train.train_and_evaluate(config, workdir)
  out = restore_and_score(config, workdir)
  out['num_devices'] = np.asarray(jax.device_count())
  np.savez(os.path.join(out_dir, f'process_{process_id}.npz'), **out)
  print(f'process {process_id}/{num_processes} done', flush=True)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]), sys.argv[7])
