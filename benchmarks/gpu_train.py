"""Accelerator training speed: images/s and MFU per batch size and dtype, and a full run.

1. For each --dtypes (float32, bfloat16: compute dtype, float32 params) and --batches
   (64 to 4096): the jitted data-parallel train step (isize 32, nc 3, ngf=ndf=64, nz=100)
   on device-resident random batches; --iters steps dispatched back to back, then one
   wait: images/s. FLOPs per step from XLA's cost analysis of the compiled step
   (`compiled.cost_analysis()['flops']`); MFU = achieved FLOP/s / the device's peak for
   that dtype (PEAKS, by device kind: dense tensor-core peak; float32 uses JAX's default
   matmul precision, which lets XLA use TF32 on NVIDIA Ampere and later, so its peak is
   the TF32 one) and / a large matmul measured in the same run (`jnp.dot`, that dtype).
2. A full CIFAR-10-sized run: --full_images (45,000) synthetic uint8 images, kept on the
   device (`DeviceTrainIterator`, config.device_data), --full_epochs (15) epochs at batch
   --full_batch (64, the paper's): wall time from building the iterator and compiling the
   step to the last step's completion (no evaluation), per dtype.

    python benchmarks/gpu_train.py                 # on a GPU / TPU machine, ~5-8 min
    python benchmarks/gpu_train.py --smoke         # tiny model, float32, batch 8, any
                                                   # backend (2 CPU cores: ~1 min)

Prints a table; writes benchmarks/results/gpu_train_<device kind>.json (--smoke: under
/tmp unless --out is given).
"""

import argparse
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # noqa: E402
from skipganomaly_jax import config as config_lib  # noqa: E402
from skipganomaly_jax import parallel as mesh_lib  # noqa: E402
from skipganomaly_jax.data import input_pipeline  # noqa: E402
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


def bench_batch(config, mesh, iters: int, rng) -> dict:
  """Compile time, FLOPs and images/s of the train step at config.batch_size."""
  batch = config.batch_size
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
  step = training_step.make_parallel_train_step(spec, mesh)
  states = mesh_lib.replicate(training_step.create_train_states(spec, jax.random.key(0)), mesh)
  shape = (batch, config.isize, config.isize, config.nc)
  pool = [
    mesh_lib.shard_batch(rng.uniform(-1, 1, shape).astype(np.float32), mesh) for _ in range(2)
  ]
  t = time.perf_counter()
  compiled = step.lower(*states, pool[0], jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float((cost or {}).get('flops', 0.0))
  g, d = states
  for i in range(2):  # Warm-up.
    g, d, m = compiled(g, d, pool[i % 2], jax.random.key(i))
  jax.block_until_ready(m)
  t = time.perf_counter()
  for i in range(iters):
    g, d, m = compiled(g, d, pool[i % 2], jax.random.key(i))
  jax.block_until_ready((g, d, m))
  seconds = (time.perf_counter() - t) / iters
  return {
    'batch': batch,
    'compile_s': compile_s,
    'step_ms': 1e3 * seconds,
    'images_per_s': batch / seconds,
    'flops_per_step': flops,
    'flops_per_s': flops / seconds,
  }


def full_run(config, mesh, images: int, epochs: int, rng) -> dict:
  """Wall time of `epochs` epochs over `images` synthetic images, compile included."""
  data = rng.integers(0, 256, (images, config.isize, config.isize, config.nc), dtype=np.uint8)
  start = time.perf_counter()
  iterator = input_pipeline.DeviceTrainIterator(data, config.batch_size, config.seed, mesh)
  spec = training_step.StepSpec.from_specs(config_lib.specs(config))
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
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--batches', default='64,256,1024,4096')
  parser.add_argument('--iters', type=int, default=30)
  parser.add_argument('--full_images', type=int, default=45000)
  parser.add_argument('--full_epochs', type=int, default=15)
  parser.add_argument('--full_batch', type=int, default=64)
  parser.add_argument('--smoke', action='store_true', help='tiny model and sizes, any backend')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if args.smoke:  # One dtype, one batch: 2 compilations of a tiny model.
    args.dtypes, args.batches, args.iters = 'float32', '8', 2
    args.full_images, args.full_epochs, args.full_batch = 32, 1, 8
  rng = np.random.default_rng(0)
  mesh = mesh_lib.make_mesh()
  kind = jax.devices()[0].device_kind
  rows, runs = [], []
  for dtype in args.dtypes.split(','):
    measured = matmul_peak(jnp.dtype(dtype), 512 if args.smoke else 8192)
    for batch in map(int, args.batches.split(',')):
      row = {
        'dtype': dtype,
        **bench_batch(make_config(dtype, batch, args.smoke), mesh, args.iters, rng),
      }
      peak = device_peak(kind, dtype)
      row['mfu'] = row['flops_per_s'] / (peak * mesh.size) if peak else None
      row['fraction_of_measured_matmul'] = row['flops_per_s'] / (measured * mesh.size)
      row['measured_matmul_flops_per_s'] = measured
      rows.append(row)
      print(json.dumps(row), flush=True)
    config = make_config(dtype, args.full_batch, args.smoke)
    runs.append({'dtype': dtype, **full_run(config, mesh, args.full_images, args.full_epochs, rng)})
    print(json.dumps(runs[-1]), flush=True)
  result = {
    'backend': jax.default_backend(),
    'device_kind': kind,
    'device_count': jax.device_count(),
    'jax': jax.__version__,
    'smoke': args.smoke,
    'setup': 'isize 32, nc 3, '
    + ('ngf=ndf=8, nz=16 (SMOKE)' if args.smoke else 'ngf=ndf=64, nz=100'),
    'peaks': {d: device_peak(kind, d) for d in args.dtypes.split(',')},
    'rows': rows,
    'full_runs': runs,
  }
  print(f'\n{kind} x {jax.device_count()}, {result["setup"]}')
  print(
    '| dtype | batch | images/s | step ms | compile s | GFLOP/step | MFU | of measured matmul |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
    print(
      f'| {r["dtype"]} | {r["batch"]} | {r["images_per_s"]:.0f} | {r["step_ms"]:.2f} | '
      f'{r["compile_s"]:.1f} | {r["flops_per_step"] / 1e9:.1f} | {mfu} | '
      f'{100 * r["fraction_of_measured_matmul"]:.1f}% |'
    )
  for r in runs:
    print(
      f'full run {r["dtype"]}: {r["images"]} images x {r["epochs"]} epochs, batch {r["batch"]}: '
      f'{r["wall_s"]:.1f} s incl. compile ({r["images_per_s_incl_compile"]:.0f} images/s)'
    )
  default_dir = pathlib.Path('/tmp') if args.smoke else ROOT / 'benchmarks' / 'results'
  out = pathlib.Path(args.out) if args.out else default_dir
  out.mkdir(parents=True, exist_ok=True)
  slug = re.sub(r'[^a-z0-9]+', '_', kind.lower()).strip('_')
  path = out / f'gpu_train_{slug}.json'
  path.write_text(json.dumps(result, indent=2))
  print(f'Wrote {path}')


if __name__ == '__main__':
  main()
