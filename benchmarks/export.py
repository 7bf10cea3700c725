"""Exported scorers (StableHLO, ONNX) against `score_fn`: file sizes, load times, images/s.

One trained run per score kind (the demo's model, ngf=ndf=64, nz=100, trained for a
single step here: the weights' values do not change the speed), exported in both
formats. The exported scorers compute only their score (for latent k-NN: G's encoder
and the bank); `score_fn` computes both scores and their terms. For
each scorer: the file size, the time to load it (StableHLO: read + `jax.export.deserialize`;
ONNX: `onnxruntime.InferenceSession`), the first call at batch 64 (StableHLO and
score_fn compile then), and the median images/s over --iters calls per batch size, each
on fresh random uint8 images, after one warm-up call.

    python benchmarks/export.py [--workdir=runs/bench_export] [--iters=10]
        [--score_kinds=latent_knn,paper]   # one run each: WORKDIR_<kind>

Prints a table and writes benchmarks/results/export_<cpu>.json.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import skipganomaly_jax  # noqa: E402
from configs import demo  # noqa: E402
from skipganomaly_jax.deploy import export  # noqa: E402
from skipganomaly_jax.training import train  # noqa: E402


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (platform.processor() is often empty)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def ensure_run(workdir: str, score_kind: str) -> None:
  """Trains the demo's model for one step (weights do not change the speed)."""
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return
  config = demo.get_config()
  config.max_steps_per_epoch = 1
  config.score_kind = score_kind
  train.train_and_evaluate(config, workdir)


def timed(fn, shape, iters: int) -> float:
  """Median seconds per call of fn on fresh uint8 images, after a warm-up call."""
  rng = np.random.default_rng(0)
  fn(rng.integers(0, 256, shape, dtype=np.uint8))
  times = []
  for _ in range(iters):
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    t = time.perf_counter()
    np.asarray(fn(x))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def once(fn, *args) -> tuple[float, object]:
  t = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return time.perf_counter() - t, out


def measure(workdir: str, batches, iters: int) -> dict:
  """Exports one run in both formats and times the three scorers."""
  load_ckpt_s, (params, config, _) = once(skipganomaly_jax.load, workdir)
  directory = export.export_run(workdir, 'stablehlo')
  export.export_run(workdir, 'onnx')
  meta = json.loads(pathlib.Path(directory, 'detector.json').read_text())
  shape = tuple(meta['input']['shape'][1:])
  x64 = np.random.default_rng(1).integers(0, 256, (64, *shape), dtype=np.uint8)
  stablehlo = pathlib.Path(directory, meta['models']['stablehlo']['file'])
  load_s, exported = once(lambda: jax.export.deserialize(bytearray(stablehlo.read_bytes())))
  import onnxruntime  # noqa: PLC0415

  onnx_path = os.path.join(directory, meta['models']['onnx']['file'])
  onnx_load_s, session = once(onnxruntime.InferenceSession, onnx_path)
  scorers = {
    'stablehlo': (load_s, exported.call, meta['models']['stablehlo']['bytes']),
    'onnx': (
      onnx_load_s,
      lambda x: session.run(['scores'], {'images': x})[0],
      meta['models']['onnx']['bytes'],
    ),
    # Load: restoring the Orbax checkpoint.
    'score_fn': (
      load_ckpt_s,
      lambda x: skipganomaly_jax.score_fn(params, x, lam=config.score_lambda),
      None,
    ),
  }
  rows = []
  for name, (load_s, fn, size) in scorers.items():
    first_s, _ = once(fn, x64)
    row = {'scorer': name, 'file_bytes': size, 'load_s': load_s, 'first_call_b64_s': first_s}
    for b in batches:
      row[f'images_per_s_b{b}'] = b / timed(fn, (b, *shape), iters)
    rows.append(row)
  return {
    'score_kind': meta['score_kind'],
    'knn_bank_rows': int(np.shape(params['knn_bank'])[0]) if 'knn_bank' in params else 0,
    'model': meta['model'],
    'versions': meta['versions']
    | {'onnxruntime': onnxruntime.__version__, 'jax2onnx': meta['models']['onnx']['jax2onnx']},
    'rows': rows,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=str(ROOT / 'runs' / 'bench_export'))
  parser.add_argument('--score_kinds', default='latent_knn,paper')
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--batches', default='1,64,256')
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(',')]
  runs = []
  for kind in args.score_kinds.split(','):
    workdir = f'{args.workdir}_{kind}'
    ensure_run(workdir, kind)
    runs.append(measure(workdir, batches, args.iters))
  result = {
    'cpu': cpu_name(),
    'cpu_count': os.cpu_count(),
    'load_average_1min_at_end': os.getloadavg()[0],  # Shared machine: >cpu_count = noisy.
    'iters': args.iters,
    **provenance(),
    'runs': runs,
  }
  header = ['score', 'scorer', 'MB', 'load s', '1st call s'] + [f'img/s b{b}' for b in batches]
  print(' | '.join(header))
  for run in runs:
    for r in run['rows']:
      size = f'{r["file_bytes"] / 1e6:.1f}' if r['file_bytes'] else '-'
      cells = [run['score_kind'], r['scorer'], size, f'{r["load_s"]:.2f}']
      cells.append(f'{r["first_call_b64_s"]:.2f}')
      print(' | '.join(cells + [f'{r[f"images_per_s_b{b}"]:.0f}' for b in batches]))
  slug = ''.join(c if c.isalnum() else '_' for c in result['cpu'].lower()).strip('_')
  out = ROOT / 'benchmarks' / 'results' / f'export_{slug}.json'
  out.write_text(json.dumps(result, indent=2) + '\n')
  print('wrote', out)


if __name__ == '__main__':
  main()
