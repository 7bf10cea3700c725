"""Training and scoring throughput, compile time, memory and FLOP utilisation.

For isize 32, nc 1 and 3, default widths (ngf=ndf=64, nz=100): the jitted data-parallel
train step (images/s), `score_fn`'s compiled batch (images/s), first-call compile time,
model FLOPs per image from XLA's cost analysis, achieved FLOP/s as a fraction of this
machine's matmul peak (measured in the same run with a large `jnp.dot`), peak host RSS
and, on GPU/TPU, peak device memory; plus the input pipeline's images/s beside them.
Compile time: `jit(...).lower(...).compile()` (no persistent cache). Timing: a warm-up
call, then the median of --iters calls, each on a fresh random batch,
each ended by `block_until_ready`.

    python benchmarks/throughput.py                       # CPU defaults
    python benchmarks/throughput.py --train_batches=64,256,1024 --dtype=bfloat16   # GPU

Prints a table and writes benchmarks/results/throughput_<backend>_<dtype>.json.
"""

import argparse
import json
import pathlib
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # noqa: E402
from skipganomaly_jax import config as config_lib  # noqa: E402
from skipganomaly_jax import parallel as mesh_lib  # noqa: E402
from skipganomaly_jax.data import input_pipeline  # noqa: E402
from skipganomaly_jax.scoring import scores
from skipganomaly_jax.training import training_step


def timed(fn, make_args, iters: int) -> float:
  """Median seconds of `iters` calls, after one warm-up call."""
  jax.block_until_ready(fn(*make_args()))
  times = []
  for _ in range(iters):
    args = make_args()
    jax.block_until_ready(args)
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def compile_and_flops(jitted, *args) -> tuple[float, float]:
  """(seconds to lower and compile, FLOPs of one call from XLA's cost analysis)."""
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return seconds, float((cost or {}).get('flops', 0.0))


def matmul_peak(dtype, n: int = 4096, iters: int = 10) -> float:
  """Achieved FLOP/s of a large square `jnp.dot` (this machine's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  seconds = timed(dot, lambda: (a, b), iters)
  return 2 * n**3 / seconds


def rates(batch: int, compile_s: float, flops: float, seconds: float) -> dict:
  """One table row: throughput and FLOP rates of a call on `batch` images."""
  return {
    'batch': batch,
    'compile_s': compile_s,
    'step_s': seconds,
    'images_per_s': batch / seconds,
    'flops_per_image': flops / batch,
    'flops_per_s': flops / seconds,
  }


def bench_train(config, batch: int, iters: int, rng) -> dict:
  """Train-step images/s, compile time and FLOPs at one global batch size."""
  config.batch_size = batch
  mesh = mesh_lib.make_mesh()
  spec = training_step.StepSpec.from_specs(config_lib.specs(config, devices=mesh.size))
  step = training_step.make_parallel_train_step(spec, mesh)
  state = list(mesh_lib.replicate(training_step.create_train_states(spec, jax.random.key(0)), mesh))
  shape = (batch, config.isize, config.isize, config.nc)
  fresh = lambda: mesh_lib.shard_batch(rng.uniform(-1, 1, shape).astype(np.float32), mesh)
  compile_s, flops = compile_and_flops(step, *state, fresh(), jax.random.key(0))
  counter = iter(range(10**9))

  def call(x):
    g, d, m = step(*state, x, jax.random.key(next(counter)))
    state[:] = [g, d]
    return m

  seconds = timed(call, lambda: (fresh(),), iters)
  return rates(batch, compile_s, flops, seconds)


def bench_score(config, batch: int, iters: int, rng) -> dict:
  """score_fn images/s (its compiled batch function), compile time and FLOPs."""
  step_spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  spec = step_spec.model
  g, d = training_step.create_train_states(step_spec, jax.random.key(0))
  params = scores.scoring_variables(g, d)
  dtype = config_lib.compute_dtype(step_spec.dtype)
  lam = scores.DEFAULT_LAMBDA
  fn = jax.jit(lambda p, x: scores.score_terms(p, x, lam, spec, dtype=dtype)['score'])
  shape = (batch, config.isize, config.isize, config.nc)
  fresh = lambda: (params, jnp.asarray(rng.uniform(-1, 1, shape).astype(np.float32)))
  compile_s, flops = compile_and_flops(fn, *fresh())
  seconds = timed(fn, fresh, iters)
  return rates(batch, compile_s, flops, seconds)


def bench_input(batch: int) -> float:
  """Images/s of the training iterator on the offline digits (uint8 -> float batches)."""
  config = default.get_config()
  config.dataset.name, config.dataset.abnormal_class, config.nc = 'mnist_offline', '0', 1
  splits = input_pipeline.load_splits(config_lib.specs(config).data)
  it = input_pipeline.TrainIterator(splits.train, batch, 0)
  n = 3 * it.steps_per_epoch
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  return n * batch / (time.perf_counter() - t)


def device_peak_memory() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train_batches', default='64,256')
  parser.add_argument('--score_batches', default='64,256,1024')
  parser.add_argument('--channels', default='1,3')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--iters', type=int, default=20)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  backend = jax.default_backend()
  peak = matmul_peak(jnp.dtype(args.dtype))
  rows = []
  for nc in map(int, args.channels.split(',')):
    config = default.get_config()
    config.nc, config.dtype = nc, args.dtype
    for kind, batches, fn in (
      ('train', args.train_batches, bench_train),
      ('score', args.score_batches, bench_score),
    ):
      for batch in map(int, batches.split(',')):
        row = {'kind': kind, 'nc': nc, **fn(config, batch, args.iters, rng)}
        row['fraction_of_matmul_peak'] = row['flops_per_s'] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
  result = {
    'backend': backend,
    'device': str(jax.devices()[0]),
    'device_count': jax.device_count(),
    'dtype': args.dtype,
    'isize': 32,
    'widths': 'ngf=ndf=64, nz=100',
    'matmul_peak_flops_per_s': peak,
    'input_images_per_s_batch64': bench_input(64),
    'peak_host_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    'peak_device_memory_mib': device_peak_memory(),
    'iters': args.iters,
    **provenance(),
    'rows': rows,
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f'throughput_{backend}_{args.dtype}.json'
  path.write_text(json.dumps(result, indent=2))
  print(
    f'\n{backend} ({result["device"]}), {args.dtype}, matmul peak '
    f'{peak / 1e9:.0f} GFLOP/s, input pipeline {result["input_images_per_s_batch64"]:.0f} '
    f'images/s, peak RSS {result["peak_host_rss_mib"]:.0f} MiB'
  )
  print('| kind | nc | batch | images/s | step ms | compile s | GFLOP/image | % of matmul peak |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["kind"]} | {r["nc"]} | {r["batch"]} | {r["images_per_s"]:.1f} | '
      f'{r["step_s"] * 1e3:.1f} | {r["compile_s"]:.1f} | {r["flops_per_image"] / 1e9:.3f} | '
      f'{100 * r["fraction_of_matmul_peak"]:.1f} |'
    )
  print(f'Wrote {path}')


if __name__ == '__main__':
  main()
