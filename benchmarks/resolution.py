"""Resolution: isize 64, 128 and 256 end to end, images/s and host memory per size.

1. End to end (tiny widths ngf=ndf=8, nz=16): a small seeded texture category with
   masks at each isize, `train.train_and_evaluate` for a few steps, then the report's
   image AUROC, pixel AUROC and PRO: proves data, masks, training, maps and metrics run.
2. Throughput and memory (default widths ngf=ndf=64, nz=100, nc=3, float32), each
   (isize, batch) in a fresh subprocess: the data-parallel train step's and the
   scoring function's images/s (median of --iters calls after a warm-up), XLA's
   memory analysis of the compiled train step, and the process's peak RSS. Peak RSS at
   two batch sizes gives a line (fixed + per-image bytes) from which batch 64 and the
   largest batch within 24 GiB are estimated, without trying to exhaust memory.

    python benchmarks/resolution.py          # ~20-30 min on a 2-core CPU

Writes benchmarks/results/resolution.{json,md}. Timings are of this (shared) machine.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from configs import default  # noqa: E402
from configs import textures as textures_config  # noqa: E402
from skipganomaly_jax import config as config_lib  # noqa: E402
from skipganomaly_jax import parallel as mesh_lib  # noqa: E402
from skipganomaly_jax.data import textures  # noqa: E402
from skipganomaly_jax.scoring import scores  # noqa: E402
from skipganomaly_jax.training import train, training_step  # noqa: E402

GIB = 2**30
BUDGET = 24 * GIB
BATCHES = {64: (8, 32), 128: (4, 16), 256: (4, 16)}


def end_to_end(isize: int, folder: str) -> dict:
  """A few tiny-model steps on a 256 px texture category at isize; the report."""
  if not (pathlib.Path(folder) / 'gravel').is_dir():
    textures.generate_texture(
      folder, 'gravel', crop=192, num_train=24, num_test_good=4, num_per_kind=2
    )
  config = textures_config.get_config()
  config.dataset.root, config.dataset.category, config.isize = folder, 'gravel', isize
  config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  config.batch_size, config.eval_batch_size, config.num_epochs = 8, 16, 1
  config.max_steps_per_epoch, config.log_every_steps = 3, 1
  config.localisation.sigma = 4.0 * isize / 256
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    report = train.train_and_evaluate(config, workdir)
  keys = ('auroc', 'pixel_auroc', 'pro', 'step')
  return {'isize': isize, 'seconds': time.perf_counter() - start, **{k: report[k] for k in keys}}


def _median_seconds(fn, iters: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def child(isize: int, batch: int, iters: int) -> dict:
  """Train and score images/s and memory at one (isize, batch), default widths."""
  config = default.get_config()
  config.isize, config.nc, config.batch_size = isize, 3, batch
  rng = np.random.default_rng(0)
  mesh = mesh_lib.make_mesh()
  step_spec = training_step.StepSpec.from_specs(config_lib.specs(config, devices=mesh.size))
  step = training_step.make_parallel_train_step(step_spec, mesh)
  g, d = mesh_lib.replicate(training_step.create_train_states(step_spec, jax.random.key(0)), mesh)
  shape = (batch, isize, isize, 3)
  x = mesh_lib.shard_batch(rng.uniform(-1, 1, shape).astype(np.float32), mesh)
  t = time.perf_counter()
  compiled = step.lower(g, d, x, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  memory = compiled.memory_analysis()
  state = [g, d]

  def train_call():
    state[0], state[1], m = step(state[0], state[1], x, jax.random.key(1))
    return m

  train_s = _median_seconds(train_call, iters)
  spec = step_spec.model
  params = scores.scoring_variables(*state)
  score = jax.jit(lambda p, v: scores.score_terms(p, v, scores.DEFAULT_LAMBDA, spec)['score'])
  xs = jnp.asarray(rng.uniform(-1, 1, (2 * batch, isize, isize, 3)).astype(np.float32))
  score_s = _median_seconds(lambda: score(params, xs), iters)
  return {
    'isize': isize,
    'batch': batch,
    'compile_s': compile_s,
    'train_images_per_s': batch / train_s,
    'score_batch': 2 * batch,
    'score_images_per_s': 2 * batch / score_s,
    'xla_temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
    'xla_argument_bytes': getattr(memory, 'argument_size_in_bytes', None),
    'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def run_child(isize: int, batch: int, iters: int) -> dict:
  out = subprocess.run(
    [sys.executable, __file__, f'--child={isize},{batch}', f'--iters={iters}'],
    check=True,
    capture_output=True,
    text=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def memory_estimate(small: dict, large: dict) -> dict:
  """Batch 64 and the largest batch within 24 GiB, from two batch sizes.

  Per-image cost: the larger of two slopes between the batches, XLA's temp bytes of the
  compiled train step (its buffer assignment) and the measured peak RSS (which also
  holds the scoring call at twice the batch, and is noisy: compilation dominates it at
  these batches). Fixed part: the larger measured peak RSS (compilation, runtime,
  parameters and optimiser state). Conservative where the two slopes disagree.
  """
  span = large['batch'] - small['batch']
  xla_slope = (large['xla_temp_bytes'] - small['xla_temp_bytes']) / span
  rss_slope = (large['peak_rss_bytes'] - small['peak_rss_bytes']) / span
  per_image = max(xla_slope, rss_slope, 1.0)
  fixed = max(small['peak_rss_bytes'], large['peak_rss_bytes'])
  return {
    'xla_slope_bytes': xla_slope,
    'rss_slope_bytes': rss_slope,
    'per_image_bytes': per_image,
    'fixed_bytes': fixed,
    'batch64_bytes': fixed + 64 * per_image,
    'max_batch_24gib': int((BUDGET - fixed) // per_image),
  }


def markdown(e2e: list, rows: list, estimates: dict) -> str:
  lines = [
    'End to end (tiny widths ngf=ndf=8, nz=16; seeded gravel category, 24 train images, '
    '3 steps of 8, 1 epoch):',
    '',
    '| isize | seconds (incl. compile) | image AUROC | pixel AUROC | PRO |',
    '|---|---|---|---|---|',
  ]
  for r in e2e:
    lines.append(
      f'| {r["isize"]} | {r["seconds"]:.0f} | {r["auroc"]:.3f} | {r["pixel_auroc"]:.3f} | '
      f'{r["pro"]:.3f} |'
    )
  lines += [
    '',
    'Default widths (ngf=ndf=64, nz=100), nc=3, float32, this 2-core CPU shared with other '
    'jobs (indicative; compare ratios):',
    '',
    '| isize | batch | train images/s | score images/s (batch) | compile s | peak RSS GiB | '
    'XLA temp GiB |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    temp = (r['xla_temp_bytes'] or 0) / GIB
    lines.append(
      f'| {r["isize"]} | {r["batch"]} | {r["train_images_per_s"]:.2f} | '
      f'{r["score_images_per_s"]:.2f} ({r["score_batch"]}) | {r["compile_s"]:.0f} | '
      f'{r["peak_rss_bytes"] / GIB:.2f} | {temp:.2f} |'
    )
  lines += [
    '',
    'Memory of a training process (train step + scoring): fixed part = the larger measured '
    'peak RSS; per image = the larger of the XLA-temp and peak-RSS slopes between the two '
    'batches.',
    '',
    '| isize | XLA temp slope MiB/image | RSS slope MiB/image | fixed (peak RSS) GiB | '
    'estimated at batch 64 GiB | largest batch in 24 GiB |',
    '|---|---|---|---|---|---|',
  ]
  for isize, e in estimates.items():
    lines.append(
      f'| {isize} | {e["xla_slope_bytes"] / 2**20:.1f} | {e["rss_slope_bytes"] / 2**20:.0f} | '
      f'{e["fixed_bytes"] / GIB:.2f} | {e["batch64_bytes"] / GIB:.1f} | '
      f'{e["max_batch_24gib"]} |'
    )
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--child', default='')
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--sizes', default='64,128,256')
  parser.add_argument('--skip_end_to_end', action='store_true')
  parser.add_argument('--summarise_only', action='store_true')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'resolution'))
  args = parser.parse_args()
  if args.child:
    isize, batch = map(int, args.child.split(','))
    print(json.dumps(child(isize, batch, args.iters)))
    return
  if args.summarise_only:  # Re-tabulate the stored measurements.
    stored = json.loads(pathlib.Path(args.out + '.json').read_text())
    rows = stored['rows']
    sizes = sorted({r['isize'] for r in rows})
    estimates = {s: memory_estimate(*[r for r in rows if r['isize'] == s]) for s in sizes}
    stored['estimates'] = estimates
    pathlib.Path(args.out + '.json').write_text(json.dumps(stored, indent=1))
    table = markdown(stored['end_to_end'], rows, estimates)
    pathlib.Path(args.out + '.md').write_text(table)
    print(table)
    return
  sizes = [int(s) for s in args.sizes.split(',')]
  e2e = []
  if args.skip_end_to_end and pathlib.Path(args.out + '.json').exists():  # Keep the stored.
    e2e = json.loads(pathlib.Path(args.out + '.json').read_text())['end_to_end']
  if not args.skip_end_to_end:
    with tempfile.TemporaryDirectory() as folder:
      for isize in sizes:
        e2e.append(end_to_end(isize, folder))
        print(json.dumps(e2e[-1]), flush=True)
  rows, estimates = [], {}
  for isize in sizes:
    pair = [run_child(isize, batch, args.iters) for batch in BATCHES[isize]]
    for row in pair:
      print(json.dumps(row), flush=True)
    rows += pair
    estimates[isize] = memory_estimate(*pair)
  table = markdown(e2e, rows, estimates)
  result = {
    **provenance(),
    'end_to_end': e2e,
    'rows': rows,
    'estimates': estimates,
    'device': str(jax.devices()),
  }
  pathlib.Path(args.out + '.json').write_text(json.dumps(result, indent=1))
  pathlib.Path(args.out + '.md').write_text(table)
  print(table)


if __name__ == '__main__':
  main()
