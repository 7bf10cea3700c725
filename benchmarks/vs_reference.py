"""Side by side on this machine: the authors' Skip-GANomaly and GANomaly (PyTorch) and ours.

One process times both codes on the same CPU cores with the same number of threads,
alternating, so the ratio holds for this CPU, whatever its load or vector units. The
official codes are imported at run time (never copied here). --models picks the models
(default both); each is timed at nc 1 and 3, isize 32, ngf=ndf=64, nz=100, float32 on both
sides: train step at batch 64, scoring at --score_batches (64 and 256).

Skip-GANomaly (--reference_dir, the skip-ganomaly repository), through
`reference_run.import_reference`, which applies its two torch-2 patches (the never-filled
noise tensor zeroed; D's backward restricted to D's parameters):
  - train step: its `set_input` + `optimize_params()` (G and D forward, G's and D's
    backward and Adam steps) vs our jitted data-parallel `train_step`;
  - scoring: its `test()` on one batch (G and D forward with its train-mode BatchNorm,
    the paper score; its min-max scaling and AUROC of that batch are included, well under
    1% of the time) vs our public `score_fn` (value checks, padding to a compiled bucket,
    eval-mode BatchNorm);
  - with nc=1 its 3-channel noise buffer cannot be added to 1-channel inputs: it is
    replaced by zeros of the input's shape (the same clean input as patch 1).
GANomaly (--ganomaly_reference_dir, the ganomaly repository: `lib.model.Ganomaly` and
its `options.Options`, with --device cpu, batch 64, manualseed 0) vs ours with
config.model.name='ganomaly' (configs/ganomaly.py on configs/default.py):
  - train step: its `set_input` + `optimize_params()` (G forward, D on x and on G(x)
    detached, G's loss with D's features recomputed, G's backward and Adam step, then D's
    BCE backward and Adam step, D re-initialised below 1e-5) vs our jitted `train_step`;
  - scoring: its `test()` on one batch (G forward with its train-mode BatchNorm, the score
    mean((latent_i - latent_o)^2), min-max scaling and the batch's AUROC) vs our public
    `score_fn`, which also runs D on x and on G(x) (score_details' rec and lat terms,
    returned beside the score): about 1.6x the official test()'s forward FLOPs;
  - no patches: it runs unchanged on torch 2.x (no noise buffer; D's graph does not pass
    through G, whose weights its G step changes in place). Only its imports are handled:
    torchvision and visdom are stubbed as for Skip-GANomaly (only plotting and image
    saving use them), and its top-level `lib` and `options` modules, which share their
    names with Skip-GANomaly's, are imported with those names cleared from sys.modules
    and the previous ones put back, so both codes live in one process. Its Options and
    Visualizer write opt.txt and loss_log.txt: into a temporary directory, as
    Skip-GANomaly's; what it prints (a D re-initialisation) is discarded.
Threads: torch.set_num_threads(--threads); XLA:CPU sizes its thread pool from the
process's CPU affinity (sched_getaffinity), so the process is pinned to --threads CPUs
before JAX and torch start (nothing to do on a machine with exactly that many).
Timing: per case, both sides warm up (ours compiles), then --rounds rounds; each round
runs one side then the other (the first side alternates), each one untimed call (so
neither pays for the other's spinning threads or cold caches) then --calls timed calls,
each on a fresh random batch from a pool made beforehand. Reported: median and best
images/s per side and their ratios (ours / official). Run on an idle machine if you can:
the load average at start and end is recorded; ratios are more robust to load than rates.

    python benchmarks/vs_reference.py [--models skipganomaly,ganomaly] \
        [--reference_dir ../shared/reference/skip-ganomaly] \
        [--ganomaly_reference_dir ../shared/reference/ganomaly]

Prints the CPU model and vector extensions and a table; writes
benchmarks/results/vs_reference_<cpu>.json (e.g. vs_reference_amd_epyc.json).
"""

import argparse
import contextlib
import functools
import importlib
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
from provenance import provenance

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


def parse_options(options, nc: int, workdir: str):
  """An official code's options (its own argparse) for one channel count, batch 64, CPU."""
  argv, sys.argv = sys.argv, ['train.py', '--device', 'cpu', '--gpu_ids', '-1']
  sys.argv += ['--nc', str(nc), '--isize', '32', '--batchsize', '64', '--manualseed', '0']
  sys.argv += ['--outf', workdir, '--ngf', '64', '--ndf', '64', '--nz', '100']
  try:
    return options().parse()
  finally:
    sys.argv = argv


class Official:
  """The official model for one channel count (batch 64 buffers; test() takes any batch)."""

  def __init__(self, reference_dir: str, nc: int, workdir: str):
    from benchmarks import reference_run  # noqa: PLC0415  (after pinning: imports jax)

    options, patched, self.torch = reference_run.import_reference(reference_dir)
    self.model = patched(parse_options(options, nc, workdir), None)

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


_REFERENCE_MODULES = ('lib', 'options')  # Top-level names used by both official codes.


def _reference_modules() -> list[str]:
  return [name for name in sys.modules if name.split('.')[0] in _REFERENCE_MODULES]


@functools.cache
def import_ganomaly(reference_dir: str):
  """(Options, Ganomaly, torch) of the authors' GANomaly, unpatched (module doc)."""
  path = pathlib.Path(reference_dir)
  if not (path / 'lib' / 'model.py').is_file() or not (path / 'options.py').is_file():
    raise FileNotFoundError(
      f'{reference_dir} is not the ganomaly repository (no lib/model.py, options.py): '
      'pass --ganomaly_reference_dir=/path/to/ganomaly.'
    )
  from benchmarks import reference_run  # noqa: PLC0415  (after pinning: imports jax)

  reference_run.stub_modules()
  import torch  # noqa: PLC0415

  saved = {name: sys.modules.pop(name) for name in _reference_modules()}
  sys.path.insert(0, str(path))
  try:
    model = importlib.import_module('lib.model')
    options = importlib.import_module('options')
  finally:
    sys.path.remove(str(path))
    for name in _reference_modules():  # Its lib and options: out of Skip-GANomaly's way.
      del sys.modules[name]
    sys.modules.update(saved)
  return options.Options, model.Ganomaly, torch


class OfficialGanomaly:
  """The authors' GANomaly for one channel count (batch 64 buffers; test() takes any batch)."""

  def __init__(self, reference_dir: str, nc: int, workdir: str):
    options, ganomaly, self.torch = import_ganomaly(reference_dir)
    self.model = ganomaly(parse_options(options, nc, workdir), None)

  tensors = Official.tensors

  def train(self, batch) -> None:
    self.model.set_input(batch)
    with contextlib.redirect_stdout(io.StringIO()):  # Prints when it re-initialises D.
      self.model.optimize_params()

  def score(self, batch) -> None:
    self.model.dataloader = {'test': _OneBatch(*batch)}
    with contextlib.redirect_stdout(io.StringIO()):
      self.model.test()


class Ours:
  """Our jitted train step and public score_fn for one model and channel count, float32."""

  def __init__(self, nc: int, model: str = 'skipganomaly'):
    import jax  # noqa: PLC0415

    from configs import default, ganomaly  # noqa: PLC0415
    from skipganomaly_jax import config as config_lib  # noqa: PLC0415
    from skipganomaly_jax import parallel as mesh_lib  # noqa: PLC0415
    from skipganomaly_jax.scoring import scores  # noqa: PLC0415
    from skipganomaly_jax.training import training_step  # noqa: PLC0415

    self.jax, self.mesh_lib, self.scoring = jax, mesh_lib, scores
    config = ganomaly.get_config('default') if model == 'ganomaly' else default.get_config()
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


def run_case(sides: dict, model: str, kind: str, nc: int, batch: int, args, rng) -> dict:
  """Alternating timing of one (model, kind, nc, batch) case; images/s per side, ratios."""
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
  row = {'model': model, 'kind': kind, 'nc': nc, 'batch': batch}
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
  print(
    '| model | case | nc | batch | official images/s | ours images/s | ours / official (median) |'
  )
  print('|---|---|---|---|---|---|---|')
  for r in result['rows']:
    o, u = r['official'], r['ours']
    print(
      f'| {r["model"]} | {r["kind"]} | {r["nc"]} | {r["batch"]} | {o["images_per_s_median"]:.1f} | '
      f'{u["images_per_s_median"]:.1f} | {r["ratio_median"]:.2f}x (best {r["ratio_best"]:.2f}x) |'
    )


# Each model's official side and the argument naming its repository.
OFFICIAL = {
  'skipganomaly': (Official, 'reference_dir'),
  'ganomaly': (OfficialGanomaly, 'ganomaly_reference_dir'),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--reference_dir', default=str(ROOT.parent / 'shared' / 'reference' / 'skip-ganomaly')
  )
  parser.add_argument(
    '--ganomaly_reference_dir', default=str(ROOT.parent / 'shared' / 'reference' / 'ganomaly')
  )
  parser.add_argument('--models', default='skipganomaly,ganomaly', help='comma-separated')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--channels', default='1,3')
  parser.add_argument('--score_batches', default='64,256')
  parser.add_argument('--rounds', type=int, default=4, help='alternations per case')
  parser.add_argument('--calls', type=int, default=2, help='timed calls per side per round')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
  args = parser.parse_args()
  args.reference_dir = os.path.abspath(args.reference_dir)
  args.ganomaly_reference_dir = os.path.abspath(args.ganomaly_reference_dir)
  models = args.models.split(',')
  if not models or set(models) - set(OFFICIAL):
    parser.error(f'--models: a comma-separated subset of {",".join(OFFICIAL)}')
  cpus = pin_threads(args.threads)  # Before JAX and torch start their thread pools.
  load_start = [round(x, 2) for x in os.getloadavg()]
  rng = np.random.default_rng(0)
  rows = []
  with tempfile.TemporaryDirectory() as workdir:  # Its Options writes opt.txt files.
    for model in models:
      official_class, reference_dir = OFFICIAL[model]
      for nc in map(int, args.channels.split(',')):
        official = official_class(getattr(args, reference_dir), nc, workdir)
        sides = {'official': official, 'ours': Ours(nc, model)}
        official.torch.set_num_threads(args.threads)
        cases = [('train', 64)] + [('score', int(b)) for b in args.score_batches.split(',')]
        for kind, batch in cases:
          rows.append(run_case(sides, model, kind, nc, batch, args, rng))
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
    **provenance(),
    'models': models,
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
