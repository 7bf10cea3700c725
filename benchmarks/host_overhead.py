"""Host (Python) time per training step and per evaluation batch of the real training loop.

    python benchmarks/host_overhead.py [--steps 300] [--repeats 3] [--label NAME]

A tiny model (ngf=ndf=4, nz=8, isize 32, nc 1, batches of 8, the offline digits of
configs/demo.py, `log_every_steps` 50 as configs/default.py) runs `train.train_epoch`,
the loop of a real run: the batch, the dispatch of the step, the wait for the step
before, the preemption check, the progress bar, the metrics fetched and written every 50
steps. Even this model keeps XLA:CPU busy for milliseconds per step (hundreds of small
ops), so the host's time is measured with the step replaced:
- 'train_host_ms_per_step' (the figure): wall time per step of `train_epoch` whose step
  is a jitted no-op of the same signature, donation and outputs (the states pass
  through, the metrics are zeros), i.e. all the loop's work and a dispatch of the
  states, and no compute; beside it the main thread's CPU time (`time.thread_time`);
- with the real (tiny) step: wall and main-thread CPU ms per step, the device's
  (XLA ops of the compiled step in a profile, as profile_step.py) and a bare loop of
  the compiled step on one batch (dispatch only, the floor with this compute);
- evaluation: wall and main-thread CPU ms per batch of `evaluation.score_dataset` over
  the test set (the tiny model's forward passes are a small part of it);
- single parts, each timed alone: next(train_iter), jax.random.fold_in (which the loop
  called every step before the step folded the count in itself), a preemption check.
Each figure is the median of --repeats epochs (or passes) after a warm-up (compilation).

The package is imported from PYTHONPATH when set (to measure another checkout, e.g. a
`git worktree` of an earlier commit), else from this repository. Prints a table and
writes benchmarks/results/host_overhead.json: one row per --label (replaced if rerun),
each with the command, this script's checkout's commit ('commit') and that of the
measured package ('package_commit').
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # After PYTHONPATH: a checkout named there wins.

import jax  # noqa: E402
from provenance import provenance  # noqa: E402

import skipganomaly_jax  # noqa: E402
from configs import demo  # noqa: E402
from skipganomaly_jax.scoring import evaluation  # noqa: E402
from skipganomaly_jax.scoring.scores import scoring_variables  # noqa: E402
from skipganomaly_jax.training import train  # noqa: E402
from skipganomaly_jax.training.preemption import PreemptionFlag  # noqa: E402


def package_commit(package: pathlib.Path) -> str:
  """HEAD of the checkout the package was imported from (e.g. a baseline worktree)."""
  result = subprocess.run(
    ['git', 'rev-parse', 'HEAD'], cwd=package, capture_output=True, text=True, check=False
  )
  return result.stdout.strip() or 'unknown'


def tiny_config(steps: int, batch: int):
  """configs/demo.py with the tiny model, `steps` steps of `batch` per epoch."""
  config = demo.get_config()
  config.model.ngf, config.model.ndf, config.model.nz = 4, 4, 8
  config.batch_size, config.eval_batch_size = batch, batch
  config.max_steps_per_epoch, config.num_epochs = steps, 100
  config.log_every_steps = 50
  return config


def time_epochs(ctx, g, d, repeats: int):
  """Median (wall, main-thread CPU) seconds per step of `train.train_epoch` over
  `repeats` epochs after a warm-up epoch; returns (wall, cpu, g, d)."""
  stop, step, walls, cpus = PreemptionFlag(), int(jax.device_get(g.step)), [], []
  for i in range(repeats + 1):
    start, cpu = time.perf_counter(), time.thread_time()
    g, d, step, finished = train.train_epoch(ctx, g, d, step, stop)
    jax.block_until_ready((g, d))
    assert finished
    if i:
      walls.append((time.perf_counter() - start) / ctx.steps_per_epoch)
      cpus.append((time.thread_time() - cpu) / ctx.steps_per_epoch)
  stop.restore()
  return statistics.median(walls), statistics.median(cpus), g, d


def no_op_step(step_fn, g, d, batch, key):
  """A jitted step of `step_fn`'s signature, donation and outputs that computes nothing:
  the states pass through, the metrics are zeros of the real ones' shapes."""
  metrics = jax.eval_shape(step_fn, g, d, batch, key)[2]
  zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), metrics)
  return jax.jit(lambda g, d, batch, key: (g, d, zeros), donate_argnums=(0, 1))


def bare_and_device(ctx, g, d, steps: int):
  """(bare seconds per step, device seconds per step) of the compiled step alone."""
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import profile_step  # noqa: PLC0415

  batch, key = next(ctx.train_iter), jax.random.key(0)
  compiled = ctx.step_fn.lower(g, d, batch, key).compile()
  state = [g, d]

  def call():
    state[0], state[1], m = compiled(state[0], state[1], batch, key)
    return m

  jax.block_until_ready(call())
  start = time.perf_counter()
  for _ in range(steps):
    m = call()
  jax.block_until_ready(m)
  bare = (time.perf_counter() - start) / steps
  sources = profile_step.op_sources(compiled.as_text())
  totals = profile_step.trace_durations(lambda: jax.block_until_ready(call()), 20)
  device = sum(us for name, us in totals.items() if name in sources) / 1e6 / 20
  return bare, device, state


def per_call(fn, calls: int) -> float:
  """Median over 3 rounds of the mean seconds per call of fn()."""
  rounds = []
  for _ in range(3):
    start = time.perf_counter()
    for i in range(calls):
      fn(i)
    rounds.append((time.perf_counter() - start) / calls)
  return statistics.median(rounds)


def parts(ctx, calls: int) -> dict:
  """Seconds per call of the loop's parts, each alone."""
  key, stop = jax.random.key(0), PreemptionFlag()
  out = {
    'next(train_iter)': per_call(lambda i: next(ctx.train_iter), calls),
    'jax.random.fold_in': per_call(lambda i: jax.random.fold_in(key, i), calls),
    'PreemptionFlag.requested': per_call(lambda i: stop.requested(), calls),
  }
  stop.restore()
  return out


def time_eval(ctx, g, d, repeats: int):
  """Median (wall, main-thread CPU) seconds per evaluation batch of the test set, and
  the number of batches."""
  variables = scoring_variables(g, d)
  images = ctx.splits.test
  evaluation.score_dataset(ctx.scorer, variables, images, stop=lambda: False)  # Compiles.
  walls, cpus = [], []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.thread_time()
    jax.block_until_ready(
      evaluation.score_dataset(ctx.scorer, variables, images, stop=lambda: False)
    )
    walls.append(time.perf_counter() - start)
    cpus.append(time.thread_time() - cpu)
  batches = -(-len(images) // ctx.specs.score.eval_batch_size)
  return statistics.median(walls) / batches, statistics.median(cpus) / batches, batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300, help='steps per timed epoch')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--label', default='working tree')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/host_overhead.json'))
  args = parser.parse_args()
  package = pathlib.Path(skipganomaly_jax.__file__).resolve().parents[1]
  print(f'package from {package}', flush=True)
  with tempfile.TemporaryDirectory() as workdir:
    ctx = train.setup(tiny_config(args.steps, args.batch), workdir)
    try:
      (g, d), _, _ = train.restore_or_init(ctx)
      loop, loop_cpu, g, d = time_epochs(ctx, g, d, args.repeats)
      real_step = ctx.step_fn
      ctx.step_fn = no_op_step(real_step, g, d, next(ctx.train_iter), jax.random.key(0))
      host, host_cpu, g, d = time_epochs(ctx, g, d, args.repeats)
      ctx.step_fn = real_step
      bare, device, (g, d) = bare_and_device(ctx, g, d, args.steps)
      items = parts(ctx, args.steps)
      eval_batch, eval_cpu, batches = time_eval(ctx, g, d, args.repeats)
    finally:
      ctx.checkpointer.close()
      ctx.writer.close()
  row = {
    'label': args.label,
    'package': str(package),
    'package_commit': package_commit(package),
    **provenance(),
    'cpu_count': os.cpu_count(),
    'load_average': os.getloadavg()[0],
    'batch': args.batch,
    'steps_per_epoch': args.steps,
    'train_host_ms_per_step': 1e3 * host,
    'train_host_thread_cpu_ms_per_step': 1e3 * host_cpu,
    'train_wall_ms_per_step': 1e3 * loop,
    'train_thread_cpu_ms_per_step': 1e3 * loop_cpu,
    'train_device_ms_per_step': 1e3 * device,
    'bare_step_ms_per_step': 1e3 * bare,
    'eval_wall_ms_per_batch': 1e3 * eval_batch,
    'eval_thread_cpu_ms_per_batch': 1e3 * eval_cpu,
    'eval_batches': batches,
    'parts_ms_per_call': {k: 1e3 * v for k, v in items.items()},
  }
  print(f'\n| {args.label} | ms |\n|---|---|')
  for key in [k for k in row if k.endswith(('_step', '_batch'))]:
    print(f'| {key} | {row[key]:.3f} |')
  for key, ms in row['parts_ms_per_call'].items():
    print(f'| {key} | {ms:.3f} |')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = json.loads(out.read_text())['rows'] if out.is_file() else []
  rows = [r for r in rows if r['label'] != args.label] + [row]
  # Top level: the latest run's commit and command; each row has its own.
  out.write_text(json.dumps({**provenance(), 'rows': rows}, indent=2) + '\n')
  print(f'Wrote {out}')


if __name__ == '__main__':
  main()
