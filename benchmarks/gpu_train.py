"""Accelerator speed: train and score images/s, MFU, a full run; one JSON with the tests.

1. Train, for each --dtypes (bfloat16, float32: compute dtype, float32 params) and
   --batches (64 to 4096): the jitted data-parallel train step (isize 32, nc 3,
   ngf=ndf=64, nz=100) on device-resident random batches; --iters steps dispatched back
   to back, then one wait: images/s. FLOPs per step from XLA's cost analysis of the
   compiled step (`compiled.cost_analysis()['flops']`); MFU = achieved FLOP/s / the
   device's peak for that dtype (PEAKS, by device kind: dense tensor-core peak; float32
   uses JAX's default matmul precision, which lets XLA use TF32 on NVIDIA Ampere and
   later, so its peak is the TF32 one) and / a large matmul measured in the same run.
2. Score: the jitted paper score of a batch (`scores.score_terms`: G, D on x and G(x)),
   per dtype and --score_batches, one device: images/s, FLOPs, MFU.
3. A full CIFAR-10-sized run per --full_dtypes: --full_images (45,000) synthetic uint8
   images kept on the device (`DeviceTrainIterator`), --full_epochs (15) at batch
   --full_batch (64, the paper's): wall time from building the iterator and compiling
   the step to the last step's completion (no evaluation).

--deadline_s bounds the whole run: an item that would not finish in time (the full run's
estimate: its steps at the measured step time, plus compiling) is skipped and listed as
such, and the JSON is rewritten after every item, so a run stopped from outside keeps
what it measured. --tests_junit adds pytest's JUnit XML reports (benchmarks/gpu.sh runs
the accelerator test subset first) as a summary.

    bash benchmarks/gpu.sh                         # on a GPU / TPU machine, < 8 min
    python benchmarks/gpu_train.py --smoke         # tiny model, any backend

Writes <--out>/gpu_train_<device kind>.json (default benchmarks/results/; --smoke: /tmp/).
"""

import argparse
import json
import os
import pathlib
import re
import sys
import time
from xml.etree import ElementTree

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import provenance  # noqa: E402

from configs import default  # noqa: E402
from skipganomaly_jax import config as config_lib  # noqa: E402
from skipganomaly_jax import parallel as mesh_lib  # noqa: E402
from skipganomaly_jax.data.device_batches import DeviceTrainIterator  # noqa: E402
from skipganomaly_jax.scoring import scores  # noqa: E402
from skipganomaly_jax.training import training_step  # noqa: E402

# Dense peak FLOP/s by device kind (vendor datasheets; SXM parts): bfloat16 and, for
# float32 at JAX's default precision, TF32 on NVIDIA (TPUs: bfloat16 passes).
PEAKS = {
  'H200': {'bfloat16': 989e12, 'float32': 495e12},
  'H100': {'bfloat16': 989e12, 'float32': 495e12},
  'A100': {'bfloat16': 312e12, 'float32': 156e12},
  'L4': {'bfloat16': 121e12, 'float32': 60e12},
  'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
  'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},
  'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
  'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12},
}
SMOKE = {  # Tiny sizes: every code path on any backend in seconds.
  'dtypes': 'float32',
  'batches': '8',
  'score_batches': '8',
  'iters': 2,
  'full_dtypes': 'float32',
  'full_images': 32,
  'full_epochs': 1,
  'full_batch': 8,
}


def device_peak(kind: str, dtype: str) -> float | None:
  """The datasheet peak of a device kind ('NVIDIA H200', 'TPU v4', ...), if known."""
  for name, peaks in PEAKS.items():
    if name.lower() in kind.lower():
      return peaks[dtype]
  return None


def matmul_peak(dtype, n: int, iters: int = 10) -> float:
  """FLOP/s of back-to-back n x n `jnp.dot`s in dtype (this device's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  dot = jax.jit(lambda a: jnp.dot(a, a))
  jax.block_until_ready(dot(a))
  t = time.perf_counter()
  out = [dot(a) for _ in range(iters)]
  jax.block_until_ready(out)
  return 2 * n**3 * iters / (time.perf_counter() - t)


def make_config(dtype: str, batch: int, smoke: bool):
  config = default.get_config()
  config.nc, config.dtype, config.batch_size = 3, dtype, batch
  if smoke:
    config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  return config


def compiled_flops(compiled) -> float:
  """FLOPs of a compiled call from XLA's cost analysis (a dict; a list of one in old jax)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float((cost or {}).get('flops', 0.0))


def timed_calls(call, args_of, iters: int) -> float:
  """Seconds per call: 2 warm-up calls, then `iters` dispatched back to back, one wait."""
  for i in range(2):
    jax.block_until_ready(call(*args_of(i)))
  t = time.perf_counter()
  out = [call(*args_of(i)) for i in range(iters)]
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def rates(batch: int, compile_s: float, flops: float, seconds: float) -> dict:
  return {
    'batch': batch,
    'compile_s': compile_s,
    'step_ms': 1e3 * seconds,
    'images_per_s': batch / seconds,
    'flops_per_step': flops,
    'flops_per_s': flops / seconds,
  }


def bench_train(config, mesh, iters: int, rng) -> dict:
  """Compile time, FLOPs and images/s of the train step at config.batch_size."""
  batch = config.batch_size
  spec = training_step.StepSpec.from_specs(config_lib.specs(config, devices=mesh.size))
  step = training_step.make_parallel_train_step(spec, mesh)
  states = mesh_lib.replicate(training_step.create_train_states(spec, jax.random.key(0)), mesh)
  shape = (batch, config.isize, config.isize, config.nc)
  pool = [
    mesh_lib.shard_batch(rng.uniform(-1, 1, shape).astype(np.float32), mesh) for _ in range(2)
  ]
  t = time.perf_counter()
  compiled = step.lower(*states, pool[0], jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  state = list(states)

  def call(x, key):  # The states are donated: keep the newest.
    *state[:], metrics = compiled(*state, x, key)
    return metrics

  seconds = timed_calls(call, lambda i: (pool[i % 2], jax.random.key(i)), iters)
  return rates(batch, compile_s, compiled_flops(compiled), seconds)


def bench_score(config, iters: int, rng) -> dict:
  """The paper score of one batch (G, then D on x and G(x)) on one device."""
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  params = scores.scoring_variables(*training_step.create_train_states(spec, jax.random.key(0)))
  dtype = config_lib.compute_dtype(spec.dtype)
  lam = config_lib.DEFAULT_LAMBDA
  fn = jax.jit(lambda p, x: scores.score_terms(p, x, lam, spec.model, dtype=dtype)['score'])
  shape = (config.batch_size, config.isize, config.isize, config.nc)
  pool = [jnp.asarray(rng.uniform(-1, 1, shape).astype(np.float32)) for _ in range(2)]
  t = time.perf_counter()
  compiled = fn.lower(params, pool[0]).compile()
  compile_s = time.perf_counter() - t
  seconds = timed_calls(compiled, lambda i: (params, pool[i % 2]), iters)
  return rates(config.batch_size, compile_s, compiled_flops(compiled), seconds)


def full_run(config, mesh, images: int, epochs: int, rng) -> dict:
  """Wall time of `epochs` epochs over `images` synthetic images, compile included."""
  data = rng.integers(0, 256, (images, config.isize, config.isize, config.nc), dtype=np.uint8)
  start = time.perf_counter()
  iterator = DeviceTrainIterator(data, config.batch_size, config.seed, mesh)
  spec = training_step.StepSpec.from_specs(config_lib.specs(config, devices=mesh.size))
  step = training_step.make_parallel_train_step(spec, mesh)
  g, d = mesh_lib.replicate(training_step.create_train_states(spec, jax.random.key(0)), mesh)
  key, steps = jax.random.key(config.seed), epochs * iterator.steps_per_epoch
  for i in range(steps):
    g, d, m = step(g, d, next(iterator), jax.random.fold_in(key, i))
  jax.block_until_ready((g, d, m))
  wall = time.perf_counter() - start
  return {
    'images': images,
    'epochs': epochs,
    'batch': config.batch_size,
    'steps': steps,
    'wall_s': wall,
    'images_per_s_incl_compile': steps * config.batch_size / wall,
    'final_g_loss': float(m['g_loss']),
    'final_d_loss': float(m['d_loss']),
  }


def junit_summary(paths: list[str]) -> dict:
  """Counts, seconds and failing test names of pytest JUnit XML reports."""
  out = {'reports': paths, 'tests': 0, 'failures': 0, 'errors': 0, 'skipped': 0}
  out.update(seconds=0.0, failed=[])
  for path in paths:
    if not pathlib.Path(path).exists():
      out['failed'].append(f'{path}: no report (the run was stopped or crashed)')
      continue
    for suite in ElementTree.parse(path).getroot().iter('testsuite'):
      for key in ('tests', 'failures', 'errors', 'skipped'):
        out[key] += int(suite.get(key, 0))
      out['seconds'] += float(suite.get('time', 0.0))
      for case in suite.iter('testcase'):
        if case.find('failure') is not None or case.find('error') is not None:
          out['failed'].append(f'{case.get("classname")}::{case.get("name")}')
  out['passed'] = out['tests'] - out['failures'] - out['errors'] - out['skipped']
  return out


class Deadline:
  """The seconds left of --deadline_s (0: no deadline), counted from the start."""

  def __init__(self, seconds: float):
    self.end = time.perf_counter() + seconds if seconds > 0 else None

  def left(self) -> float:
    return float('inf') if self.end is None else self.end - time.perf_counter()


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--batches', default='64,256,1024,4096')
  parser.add_argument('--score_batches', default='256,1024,4096')
  parser.add_argument('--iters', type=int, default=30)
  parser.add_argument('--full_dtypes', default='bfloat16,float32', help='the first runs second')
  parser.add_argument('--full_images', type=int, default=45000)
  parser.add_argument('--full_epochs', type=int, default=15)
  parser.add_argument('--full_batch', type=int, default=64)
  parser.add_argument('--deadline_s', type=float, default=0.0, help='0: none')
  parser.add_argument('--tests_junit', default='', help='comma-separated JUnit XML paths')
  parser.add_argument('--smoke', action='store_true', help='tiny model and sizes, any backend')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if args.smoke:
    for name, value in SMOKE.items():
      setattr(args, name, value)
  return args


def with_mfu(row: dict, kind: str, dtype: str, devices: int, measured: float) -> dict:
  peak = device_peak(kind, dtype)
  row['mfu'] = row['flops_per_s'] / (peak * devices) if peak else None
  row['fraction_of_measured_matmul'] = row['flops_per_s'] / (measured * devices)
  row['measured_matmul_flops_per_s'] = measured
  return row


def jobs(args) -> list[tuple[str, str, int]]:
  """(group, dtype, batch) in the order they run, the most wanted first (a deadline cuts
  the tail): the train step at the full run's batch and a full run in the first dtype,
  then every dtype's train batch sizes, the scoring batch sizes, the other full runs."""
  dtypes, full = args.dtypes.split(','), args.full_dtypes.split(',')
  first = [('train', dtypes[0], args.full_batch), ('full', full[0], args.full_batch)]
  rest = [
    (g, d, int(b))
    for g, bs in (('train', args.batches), ('score', args.score_batches))
    for d in dtypes
    for b in bs.split(',')
  ]
  rest += [('full', d, args.full_batch) for d in full[1:]]
  return first + [job for job in rest if job not in first]


def measure(args, result: dict, save) -> None:
  """Fills result's 'train', 'score' and 'full_runs' (see `jobs`) within the deadline."""
  rng, mesh, kind = np.random.default_rng(0), mesh_lib.make_mesh(), result['device_kind']
  deadline, step_s, peaks = Deadline(args.deadline_s), {}, {}
  for group, dtype, batch in jobs(args):
    config = make_config(dtype, batch, args.smoke)
    if group == 'full':
      seconds, compile_s = step_s.get(dtype, (0.0, 30.0))
      steps = args.full_epochs * (args.full_images // batch)
      estimate = steps * seconds + 1.5 * compile_s + 10
      if estimate > deadline.left():
        result['skipped'].append(f'full run {dtype}: estimated {estimate:.0f} s > time left')
        continue
      run = full_run(config, mesh, args.full_images, args.full_epochs, rng)
      result['full_runs'].append({'dtype': dtype, 'estimated_s': estimate, **run})
      print(json.dumps(result['full_runs'][-1]), flush=True)
      save()
      continue
    if deadline.left() < 30:  # A compile of the full model takes 10-30 s.
      result['skipped'].append(f'{group} {dtype} batch {batch}: deadline')
      continue
    if dtype not in peaks:
      peaks[dtype] = matmul_peak(jnp.dtype(dtype), 512 if args.smoke else 8192)
    if group == 'train':
      row = bench_train(config, mesh, args.iters, rng)
      if batch == args.full_batch:
        step_s[dtype] = (row['step_ms'] / 1e3, row['compile_s'])
    else:
      row = bench_score(config, args.iters, rng)
    devices = mesh.size if group == 'train' else 1
    result[group].append({'dtype': dtype, **with_mfu(row, kind, dtype, devices, peaks[dtype])})
    print(json.dumps(result[group][-1]), flush=True)
    save()


def print_tables(result: dict) -> None:
  print(f'\n{result["device_kind"]} x {result["device_count"]}, {result["setup"]}')
  print('| kind | dtype | batch | images/s | step ms | compile s | GFLOP/step | MFU | of matmul |')
  print('|---|---|---|---|---|---|---|---|---|')
  for group in ('train', 'score'):
    for r in result[group]:
      mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
      print(
        f'| {group} | {r["dtype"]} | {r["batch"]} | {r["images_per_s"]:.0f} | '
        f'{r["step_ms"]:.2f} | {r["compile_s"]:.1f} | {r["flops_per_step"] / 1e9:.1f} | '
        f'{mfu} | {100 * r["fraction_of_measured_matmul"]:.1f}% |'
      )
  for r in result['full_runs']:
    print(
      f'full run {r["dtype"]}: {r["images"]} images x {r["epochs"]} epochs, batch '
      f'{r["batch"]}: {r["wall_s"]:.1f} s incl. compile '
      f'({r["images_per_s_incl_compile"]:.0f} images/s)'
    )
  for item in result['skipped']:
    print(f'skipped: {item}')
  tests = result.get('tests')
  if tests:
    print(
      f'tests: {tests["passed"]} passed, {tests["failures"] + tests["errors"]} failed, '
      f'{tests["skipped"]} skipped ({tests["seconds"]:.0f} s){"; " if tests["failed"] else ""}'
      + ', '.join(tests['failed'])
    )


def main() -> None:
  args = parse_args()
  kind = jax.devices()[0].device_kind
  result = {
    **provenance(),
    'backend': jax.default_backend(),
    'device_kind': kind,
    'device_count': jax.device_count(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'smoke': args.smoke,
    'args': vars(args),
    'env': {k: os.environ.get(k, '') for k in ('XLA_FLAGS', 'JAX_DEFAULT_MATMUL_PRECISION')},
    'setup': 'isize 32, nc 3, '
    + ('ngf=ndf=8, nz=16 (SMOKE)' if args.smoke else 'ngf=ndf=64, nz=100'),
    'peaks': {d: device_peak(kind, d) for d in ('bfloat16', 'float32')},
    'train': [],
    'score': [],
    'full_runs': [],
    'skipped': [],
  }
  if args.tests_junit:
    result['tests'] = junit_summary(args.tests_junit.split(','))
  default_dir = pathlib.Path('/tmp') if args.smoke else ROOT / 'benchmarks' / 'results'
  out = pathlib.Path(args.out) if args.out else default_dir
  out.mkdir(parents=True, exist_ok=True)
  path = out / f'gpu_train_{re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")}.json'
  save = lambda: path.write_text(json.dumps(result, indent=2))
  save()
  measure(args, result, save)
  print_tables(result)
  print(f'Wrote {path}')


if __name__ == '__main__':
  main()
