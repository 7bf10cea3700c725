"""Side by side on this machine: the official Skip-GANomaly (PyTorch) and ours, alternating.

One process times both codes on the same CPU cores with the same number of threads, so the
ratio holds for this CPU, whatever its load or vector units:
  - the official code is imported at run time from --reference_dir (never copied here)
    through `reference_run.import_reference`, which applies its two torch-2 patches (the
    never-filled noise tensor zeroed; D's backward restricted to D's parameters);
  - train step, batch 64: its `set_input` + `optimize_params()` (G and D forward, G's and
    D's backward and Adam steps) vs our jitted data-parallel `train_step`;
  - scoring, batches 64 and 256: its `test()` on one batch (G and D forward with its
    train-mode BatchNorm, the paper score; its min-max scaling and AUROC of that batch
    are included, well under 1% of the time) vs our public `score_fn` (value checks,
    padding to a compiled bucket, eval-mode BatchNorm);
  - nc 1 and 3, isize 32, ngf=ndf=64, nz=100, float32 on both sides. With nc=1 its
    3-channel noise buffer cannot be added to 1-channel inputs: it is replaced by zeros of
    the input's shape (the same clean input as patch 1).
Threads: torch.set_num_threads(--threads); XLA:CPU sizes its thread pool from the
process's CPU affinity (sched_getaffinity), so the process is pinned to --threads CPUs
before JAX and torch start (nothing to do on a machine with exactly that many).
Timing: per case, both sides warm up (ours compiles), then --rounds rounds; each round
runs one side then the other (the first side alternates), each one untimed call (so
neither pays for the other's spinning threads or cold caches) then --calls timed calls,
each on a fresh random batch from a pool made beforehand. Reported: median and best
images/s per side and their ratios (ours / official). Run on an idle machine if you can:
the load average at start and end is recorded; ratios are more robust to load than rates.

    python benchmarks/vs_reference.py [--reference_dir ../shared/reference/skip-ganomaly]

Prints the CPU model and vector extensions and a table; writes
benchmarks/results/vs_reference_<cpu>.json (e.g. vs_reference_amd_epyc.json).
"""

import argparse
import contextlib
import io
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VECTOR_FLAGS = (
  'sse4_2',
  'avx',
  'avx2',
  'fma',
  'avx512f',
  'avx512bw',
  'avx512vl',
  'avx512_vnni',
  'avx512_bf16',
  'amx_tile',
  'amx_bf16',
  'amx_fp16',
  'asimd',
  'sve',
)


def cpu_info() -> dict:
  """CPU model, vector extensions (of VECTOR_FLAGS) and logical CPUs, from /proc/cpuinfo."""
  model, flags = platform.processor() or platform.machine(), set()
  with contextlib.suppress(OSError):
    text = pathlib.Path('/proc/cpuinfo').read_text()
    found = re.search(r'^(model name|Model|CPU part)\s*:\s*(.+)$', text, re.M)
    model = found.group(2).strip() if found else model
    line = re.search(r'^(flags|Features)\s*:\s*(.+)$', text, re.M)
    flags = set(line.group(2).split()) if line else set()
  return {
    'model': model,
    'vector_extensions': [f for f in VECTOR_FLAGS if f in flags],
    'logical_cpus': os.cpu_count(),
  }


def cpu_slug(model: str) -> str:
  """'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz' -> 'intel_xeon_platinum_8481c'."""
  model = re.sub(r'\((r|tm)\)|\bcpu\b|@.*$|\d+-core processor', ' ', model.lower())
  return re.sub(r'[^a-z0-9]+', '_', model).strip('_') or 'unknown_cpu'


def pin_threads(n: int) -> int:
  """Restricts this process to its first n allowed CPUs; returns the CPUs it may use."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) > n:
    os.sched_setaffinity(0, cpus[:n])
  return len(os.sched_getaffinity(0))


class Official:
  """The official model for one channel count (batch 64 buffers; test() takes any batch)."""

  def __init__(self, reference_dir: str, nc: int, workdir: str):
    from benchmarks import reference_run  # noqa: PLC0415  (after pinning: imports jax)

    options, patched, self.torch = reference_run.import_reference(reference_dir)
    argv, sys.argv = sys.argv, ['train.py', '--device', 'cpu', '--gpu_ids', '-1']
    sys.argv += ['--nc', str(nc), '--isize', '32', '--batchsize', '64', '--manualseed', '0']
    sys.argv += ['--outf', workdir, '--ngf', '64', '--ndf', '64', '--nz', '100']
    try:
      opt = options().parse()
    finally:
      sys.argv = argv
    self.model = patched(opt, None)

  def tensors(self, x: np.ndarray):
    """NHWC float32 -> (NCHW tensor, labels with both classes, as its roc needs)."""
    t = self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return t, self.torch.arange(len(x)) % 2

  def train(self, batch) -> None:
    model = self.model
    model.set_input(batch)
    if model.noise.shape != model.input.shape:  # nc=1 (module doc): zeros, as patch 1.
      model.noise = self.torch.zeros_like(model.input)
    model.optimize_params()

  def score(self, batch) -> None:
    images = batch[0]
    self.model.data = types.SimpleNamespace(valid=_OneBatch(images, batch[1]))
    with contextlib.redirect_stdout(io.StringIO()):  # It prints a line per call.
      self.model.test()


class _OneBatch(list):
  """A one-batch 'DataLoader' for test(): iterable, with a .dataset of the right length."""

  def __init__(self, images, labels):
    super().__init__([(images, labels)])
    self.dataset = images


class Ours:
  """Our jitted train step and public score_fn for one channel count, float32."""

  def __init__(self, nc: int):
    import jax  # noqa: PLC0415

    from configs import default  # noqa: PLC0415
    from skipganomaly_jax import config as config_lib  # noqa: PLC0415
    from skipganomaly_jax import parallel as mesh_lib  # noqa: PLC0415
    from skipganomaly_jax.scoring import scores  # noqa: PLC0415
    from skipganomaly_jax.training import training_step  # noqa: PLC0415

    self.jax, self.mesh_lib, self.scoring = jax, mesh_lib, scores
    config = default.get_config()
    config.nc, config.batch_size, config.dtype = nc, 64, 'float32'
    self.mesh = mesh_lib.make_mesh(jax.devices()[:1])
    spec = training_step.StepSpec.from_specs(config_lib.specs(config))
    self.step = training_step.make_parallel_train_step(spec, self.mesh)
    states = training_step.create_train_states(spec, jax.random.key(0))
    self.state = list(mesh_lib.replicate(states, self.mesh))
    # Copies: replicating onto the one device may alias the buffers the step donates.
    self.params = jax.tree.map(lambda a: a.copy(), scores.scoring_variables(*states))
    self.calls = 0

  def tensors(self, x: np.ndarray):
    return x

  def train(self, x) -> None:
    self.calls += 1
    batch = self.mesh_lib.shard_batch(x, self.mesh)
    g, d, metrics = self.step(*self.state, batch, self.jax.random.key(self.calls))
    self.state = [g, d]
    self.jax.block_until_ready(metrics)

  def score(self, x) -> None:
    self.jax.block_until_ready(self.scoring.score_fn(self.params, x))


def time_calls(fn, pool, calls: int) -> list[float]:
  """One untimed call, then `calls` timed calls (seconds) cycling through the pool."""
  fn(pool[0])
  times = []
  for i in range(calls):
    t = time.perf_counter()
    fn(pool[1 + i % (len(pool) - 1)])
    times.append(time.perf_counter() - t)
  return times


def run_case(sides: dict, kind: str, nc: int, batch: int, args, rng) -> dict:
  """Alternating timing of one (kind, nc, batch) case; images/s per side and ratios."""
  images = [rng.uniform(-1, 1, (batch, 32, 32, nc)).astype(np.float32) for _ in range(4)]
  pools = {name: [side.tensors(x) for x in images] for name, side in sides.items()}
  fns = {name: getattr(side, kind) for name, side in sides.items()}
  first = {}
  for name, fn in fns.items():  # Warm-up; ours compiles here.
    t = time.perf_counter()
    fn(pools[name][0])
    first[name] = time.perf_counter() - t
  times = {name: [] for name in sides}
  order = list(sides)
  for r in range(args.rounds):
    for name in order if r % 2 == 0 else order[::-1]:
      times[name] += time_calls(fns[name], pools[name], args.calls)
  row = {'kind': kind, 'nc': nc, 'batch': batch}
  for name, ts in times.items():
    row[name] = {
      'images_per_s_median': batch / statistics.median(ts),
      'images_per_s_best': batch / min(ts),
      'first_call_s': first[name],
      'calls': len(ts),
    }
  row['ratio_median'] = row['ours']['images_per_s_median'] / row['official']['images_per_s_median']
  row['ratio_best'] = row['ours']['images_per_s_best'] / row['official']['images_per_s_best']
  return row


def print_table(result: dict) -> None:
  cpu = result['cpu']
  print(f'\nCPU: {cpu["model"]} ({", ".join(cpu["vector_extensions"]) or "-"}), ', end='')
  print(f'{result["threads"]} threads each, load average {result["load_average_start"]} ', end='')
  print(f'-> {result["load_average_end"]}')
  print('| case | nc | batch | official images/s | ours images/s | ours / official (median) |')
  print('|---|---|---|---|---|---|')
  for r in result['rows']:
    o, u = r['official'], r['ours']
    print(
      f'| {r["kind"]} | {r["nc"]} | {r["batch"]} | {o["images_per_s_median"]:.1f} | '
      f'{u["images_per_s_median"]:.1f} | {r["ratio_median"]:.2f}x (best {r["ratio_best"]:.2f}x) |'
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--reference_dir', default=str(ROOT.parent / 'shared' / 'reference' / 'skip-ganomaly')
  )
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--channels', default='1,3')
  parser.add_argument('--score_batches', default='64,256')
  parser.add_argument('--rounds', type=int, default=4, help='alternations per case')
  parser.add_argument('--calls', type=int, default=2, help='timed calls per side per round')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
  args = parser.parse_args()
  args.reference_dir = os.path.abspath(args.reference_dir)
  cpus = pin_threads(args.threads)  # Before JAX and torch start their thread pools.
  load_start = [round(x, 2) for x in os.getloadavg()]
  rng = np.random.default_rng(0)
  rows = []
  with tempfile.TemporaryDirectory() as workdir:  # Its Options writes opt.txt files.
    for nc in map(int, args.channels.split(',')):
      sides = {'official': Official(args.reference_dir, nc, workdir), 'ours': Ours(nc)}
      sides['official'].torch.set_num_threads(args.threads)
      cases = [('train', 64)] + [('score', int(b)) for b in args.score_batches.split(',')]
      for kind, batch in cases:
        rows.append(run_case(sides, kind, nc, batch, args, rng))
        print(json.dumps(rows[-1]), flush=True)
  import jax  # noqa: PLC0415
  import torch  # noqa: PLC0415

  result = {
    'cpu': cpu_info(),
    'threads': args.threads,
    'cpus_allowed': cpus,
    'torch_threads': torch.get_num_threads(),
    'load_average_start': load_start,
    'load_average_end': [round(x, 2) for x in os.getloadavg()],
    'versions': {'torch': torch.__version__, 'jax': jax.__version__},
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'setup': 'isize 32, ngf=ndf=64, nz=100, float32; train batch 64; ratio = ours / official',
    'rounds': args.rounds,
    'calls_per_round': args.calls,
    'rows': rows,
  }
  print_table(result)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f'vs_reference_{cpu_slug(result["cpu"]["model"])}.json'
  path.write_text(json.dumps(result, indent=2))
  print(f'Wrote {path}')


if __name__ == '__main__':
  main()
