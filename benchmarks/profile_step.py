"""Where the train step's time goes: XLA's own profile, per layer, forward and backward.

Compiles the jitted data-parallel train step (isize 32, ngf=ndf=64, nz=100, float32,
batch --batch, nc --nc), runs --steps steps under `jax.profiler.trace` (a Perfetto
trace), and sums the duration of every XLA operation (thunk) event per step. Each op is
mapped to its source through the compiled HLO's `op_name` metadata: the network and
layer (`G/down_3`, `D/features/conv_2`, ...), and 'bwd' when the op belongs to the
backward pass (`transpose(...)` in its name), else 'fwd'; ops without a layer (losses,
Adam, the D re-init select) are grouped by their last name component. Prints the top
items and each category's share (convolution, dot, fusion, copy/transpose, ...).

    python benchmarks/profile_step.py [--nc 3] [--batch 64] [--steps 5] [--top 25]

Writes benchmarks/results/profile_step_<backend>.json. Op durations are summed over
threads: when XLA runs independent ops concurrently, the sum exceeds the wall time.
"""

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax
import numpy as np
from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # noqa: E402
from skipganomaly_jax import config as config_lib  # noqa: E402
from skipganomaly_jax import parallel as mesh_lib  # noqa: E402
from skipganomaly_jax.training import training_step  # noqa: E402

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(.*?op_name="([^"]+)"')


def op_sources(hlo_text: str) -> dict:
  """{HLO instruction name: (opcode, op_name metadata)} of the compiled module."""
  found = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      found[m.group(1)] = (m.group(3), m.group(4))
  return found


def source_key(op_name: str) -> tuple[str, str]:
  """('G/<layer>' | 'D/<layer>' | 'outside the networks', 'fwd' | 'bwd') of an op_name."""
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  parts = op_name.split('/')
  for i, part in enumerate(parts):
    net = 'G' if 'Generator' in part else 'D' if 'Discriminator' in part else None
    if net:
      layer = next((p for p in parts[i + 1 :] if re.fullmatch(r'[a-z_]+_\d+|[a-z]+', p)), '')
      return f'{net}/{layer}', direction
  return 'outside the networks (Adam, losses, D re-init)', direction


def category(name: str) -> str:
  """A coarse kind of an XLA:CPU op from its (fusion) name."""
  if name.startswith(('ynn_fusion', 'xnn_fusion', 'onednn')):
    return 'matmul/conv library fusion (YNNPACK)'
  if name.startswith(('convolution', 'dot')):
    return 'XLA convolution / dot'
  if re.match(r'(copy|transpose|concatenate|bitcast|slice|pad|dynamic)', name):
    return 'data movement (copy, transpose, concatenate, slice, pad)'
  if 'reduce' in name:
    return 'reductions (BatchNorm statistics, losses, sums)'
  return 'elementwise fusions (BatchNorm, activations, Adam, ...)'


def trace_durations(step_fn, steps: int) -> dict:
  """{event name: total microseconds over `steps` calls} from a Perfetto trace."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        step_fn()
    files = glob.glob(f'{tmp}/**/perfetto_trace.json.gz', recursive=True)
    events = json.loads(gzip.open(files[0]).read())
  events = events['traceEvents'] if isinstance(events, dict) else events
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e:
      totals[e['name']] += float(e['dur'])
  return totals


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--nc', type=int, default=3)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
  args = parser.parse_args()
  config = default.get_config()
  config.nc, config.batch_size = args.nc, args.batch
  mesh = mesh_lib.make_mesh()
  spec = training_step.StepSpec.from_specs(config_lib.specs(config, devices=mesh.size))
  step = training_step.make_parallel_train_step(spec, mesh)
  state = list(mesh_lib.replicate(training_step.create_train_states(spec, jax.random.key(0)), mesh))
  x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 32, 32, args.nc)).astype(np.float32)
  batch = mesh_lib.shard_batch(x, mesh)
  compiled = step.lower(*state, batch, jax.random.key(0)).compile()
  sources = op_sources(compiled.as_text())

  def call():
    g, d, m = compiled(*state, batch, jax.random.key(1))
    state[:] = [g, d]
    jax.block_until_ready(m)

  call()
  t = time.perf_counter()
  for _ in range(args.steps):
    call()
  wall_ms = 1e3 * (time.perf_counter() - t) / args.steps
  totals = trace_durations(call, args.steps)
  by_source, by_category, ops = collections.Counter(), collections.Counter(), []
  for name, us in totals.items():
    if name not in sources:
      continue
    opcode, op_name = sources[name]
    ms = us / 1e3 / args.steps
    layer, direction = source_key(op_name)
    by_source[f'{layer} {direction}'] += ms
    by_category[category(name)] += ms
    ops.append({'op': name, 'ms': ms, 'layer': layer, 'dir': direction, 'op_name': op_name})
  total = sum(by_category.values())
  print(
    f'train step nc={args.nc} batch={args.batch}: wall {wall_ms:.0f} ms/step, XLA ops '
    f'{total:.0f} ms/step summed over threads ({len(ops)} ops)'
  )
  print('\n| layer / group | direction | ms/step | share |\n|---|---|---|---|')
  for key, ms in by_source.most_common(args.top):
    layer, direction = key.rsplit(' ', 1)
    print(f'| {layer} | {direction} | {ms:.1f} | {100 * ms / total:.1f}% |')
  print('\n| op category | ms/step | share |\n|---|---|---|')
  for key, ms in by_category.most_common():
    print(f'| {key} | {ms:.1f} | {100 * ms / total:.1f}% |')
  ops.sort(key=lambda o: -o['ms'])
  result = {
    'backend': jax.default_backend(),
    'nc': args.nc,
    'batch': args.batch,
    **provenance(),
    'wall_ms_per_step': wall_ms,
    'ops_ms_per_step': total,
    'by_layer': dict(by_source.most_common()),
    'by_category': dict(by_category.most_common()),
    'top_ops': ops[: 4 * args.top],
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f'profile_step_{jax.default_backend()}.json'
  path.write_text(json.dumps(result, indent=2))
  print(f'Wrote {path}')


if __name__ == '__main__':
  main()
