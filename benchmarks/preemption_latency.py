"""Seconds from SIGTERM to exit of a training run (main.py), at several moments of a run.

    python benchmarks/preemption_latency.py [--config=configs/demo.py] [--repeats=1]
    python benchmarks/preemption_latency.py --processes=2 [--signal_process=1]

Each scenario starts a fresh run of --config (default: the offline demo with the paper's
model, ngf=ndf=64), waits for its moment, sends SIGTERM and times the exit of every
process; a run exits after its checkpoint is written (the checkpointer's close waits
for it), so this bounds the time from SIGTERM to the saved checkpoint. Moments:
- 'startup': 2 s after the first log line (data loading, initialisation);
- 'first step': at the 'Training from step' line, while the first step compiles;
- 'training': right after the first logged training step (step 10 of the demo);
- 'evaluation start': right after the last training step is logged, while the
  evaluation functions compile;
- 'evaluation': 6 s later, while the k-NN bank is being scored.
No compilation cache (a fresh run compiles everything). --processes=N runs N CPU
processes of one `jax.distributed` job on this machine (one CPU device each,
--coordinator_address on 127.0.0.1) and sends SIGTERM to process --signal_process only:
the others learn of it through JAX's preemption service (training/preemption.py).

    python benchmarks/preemption_latency.py --check_processes=2

instead times one check in that many CPU processes: JAX's `reached_preemption_sync_point`
(what a multi-process run does) and an all-gather of the flags (the fallback).
Prints a table; writes benchmarks/results/preemption_latency.json, one entry per mode
('single_process', 'multi_process', 'check_cost'), each with its commit and command
(those of the top level: the latest run's).
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from provenance import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCENARIOS = (
  ('startup', 'started', 2.0),
  ('first step', 'training_from', 0.0),
  ('training', 'first_step', 0.0),
  ('evaluation start', 'last_step', 0.0),
  ('evaluation', 'last_step', 6.0),
)


def train_steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / 'metrics.jsonl'
  if not path.is_file():
    return []
  lines = path.read_text().split('\n')[:-1]
  return [r['step'] for r in map(json.loads, lines) if 'train/g_loss' in r]


def reached(moment: str, workdir: pathlib.Path, log: pathlib.Path, last_step: int) -> bool:
  if moment in ('started', 'training_from'):
    line = 'JAX process' if moment == 'started' else 'Training from step'
    return log.is_file() and line in log.read_text()
  steps = train_steps(workdir)
  return bool(steps) and (moment == 'first_step' or steps[-1] >= last_step)


def start(config: str, workdir: pathlib.Path, base: pathlib.Path, processes: int) -> list:
  """Starts the run's processes (stderr to base/stderr_<i>.txt); returns them."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  cmd = [sys.executable, str(ROOT / 'main.py'), f'--config={config}', f'--workdir={workdir}']
  port = 20000 + (os.getpid() + int(time.time())) % 20000
  procs = []
  for i in range(processes):
    extra = []
    if processes > 1:
      extra = [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}']
      extra += [f'--process_id={i}']
      env['JAX_PLATFORMS'] = 'cpu'
    with open(base / f'stderr_{i}.txt', 'w') as err:
      procs.append(
        subprocess.Popen(cmd + extra, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
      )
  return procs


def wait_all(procs: list, sent: float) -> tuple[list, float]:
  """(exit codes, seconds from `sent` until the last process exited)."""
  codes, last = [None] * len(procs), sent
  deadline = time.perf_counter() + 600
  while None in codes and time.perf_counter() < deadline:
    for i, p in enumerate(procs):
      if codes[i] is None and p.poll() is not None:
        codes[i], last = p.returncode, time.perf_counter()
    time.sleep(0.01)
  return codes, last - sent


def one(args, moment: str, delay: float, base: pathlib.Path) -> dict:
  """Runs main.py until `moment` + `delay`, sends SIGTERM, returns the timings."""
  workdir, log = base / 'run', base / 'stderr_0.txt'
  procs = start(args.config, workdir, base, args.processes)
  begin = time.perf_counter()
  try:
    while not reached(moment, workdir, log, args.last_step):
      if any(p.poll() is not None for p in procs):
        raise RuntimeError(f'the run ended before {moment}:\n{log.read_text()[-2000:]}')
      time.sleep(0.05)
    time.sleep(delay)
    sent = time.perf_counter()
    procs[args.signal_process % len(procs)].send_signal(signal.SIGTERM)
    codes, seconds = wait_all(procs, sent)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  saved = [
    line.split('saved step ')[1].split(';')[0]
    for line in log.read_text().split('\n')
    if 'Preempted: saved step' in line
  ]
  return {
    'since_start_s': round(sent - begin, 1),
    'signal_to_exit_s': round(seconds, 2),
    'exit_code': codes[0] if len(codes) == 1 else codes,
    'saved_step': int(saved[-1]) if saved else None,
  }


def _check_worker(port: int, count: int, index: int, calls: int) -> None:
  """One process of the check timing: prints the mean seconds per check of each kind."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  jax.config.update('jax_platforms', 'cpu')
  jax.distributed.initialize(f'127.0.0.1:{port}', count, index, initialization_timeout=120)
  multihost_utils.process_allgather(np.int32(0))  # Compiles.
  start = time.perf_counter()
  for _ in range(calls):
    multihost_utils.process_allgather(np.int32(0)).max()
  allgather = (time.perf_counter() - start) / calls
  start = time.perf_counter()
  for i in range(1, 100 * calls + 1):
    multihost_utils.reached_preemption_sync_point(i)
  sync = (time.perf_counter() - start) / (100 * calls)
  out = {'process': index, 'allgather_s': allgather, 'reached_sync_point_s': sync}
  print(json.dumps(out), flush=True)


def time_checks(processes: int, calls: int = 200) -> list[dict]:
  """Seconds per check of each kind in each of `processes` CPU processes."""
  port = 20000 + os.getpid() % 20000
  code = (
    f'import sys; sys.path.insert(0, {str(ROOT / "benchmarks")!r}); '
    'import preemption_latency as p; p._check_worker(*map(int, sys.argv[1:]))'
  )
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', code, str(port), str(processes), str(i), str(calls)],
      stdout=subprocess.PIPE,
      text=True,
    )
    for i in range(processes)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  return [json.loads(o.strip().split('\n')[-1]) for o in outs]


def write(path: str, key: str, entry: dict) -> None:
  """Stores `entry` (with its commit and command) under `key` of the JSON at `path`."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  data = json.loads(out.read_text()) if out.is_file() else {}
  if 'rows' in data:  # The earlier single-mode layout: its single-process rows.
    data = {'single_process': data}
  data[key] = {**provenance(), 'cpu_count': os.cpu_count(), **entry}
  data.update(provenance())  # Top level: the latest run's; each entry has its own.
  out.write_text(json.dumps(data, indent=2) + '\n')


def print_table(rows: list) -> None:
  print(
    f'\n{"moment":<18} {"since start s":>13} {"signal->exit s":>15} {"exit":>8} {"saved step":>10}'
  )
  for r in rows:
    print(
      f'{r["moment"]:<18} {r["since_start_s"]:>13} {r["signal_to_exit_s"]:>15} '
      f'{str(r["exit_code"]):>8} {str(r["saved_step"]):>10}'
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--last_step', type=int, default=53, help="the config's steps per epoch")
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--processes', type=int, default=1)
  parser.add_argument('--signal_process', type=int, default=1, help='with --processes > 1')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/preemption_latency.json'))
  parser.add_argument('--check_processes', type=int, default=0)
  parser.add_argument('--moments', default='', help='comma-separated subset of the moments')
  args = parser.parse_args()
  if args.check_processes:
    per_process = time_checks(args.check_processes)
    for r in per_process:
      print(
        f'process {r["process"]}: all-gather {r["allgather_s"] * 1e3:.3f} ms, '
        f'reached_preemption_sync_point {r["reached_sync_point_s"] * 1e6:.2f} us per check'
      )
    write(args.out, 'check_cost', {'processes': args.check_processes, 'rows': per_process})
    return
  rows = []
  wanted = set(args.moments.split(',')) if args.moments else {name for name, _, _ in SCENARIOS}
  for name, moment, delay in (s for s in SCENARIOS if s[0] in wanted):
    for _ in range(args.repeats):
      with tempfile.TemporaryDirectory() as base:
        rows.append({'moment': name, **one(args, moment, delay, pathlib.Path(base))})
      print(rows[-1], flush=True)
  print_table(rows)
  worst = max(r['signal_to_exit_s'] for r in rows)
  print(f'worst case: {worst:.1f} s ({os.cpu_count()} CPU cores, {args.processes} process(es))')
  key = 'single_process' if args.processes == 1 else 'multi_process'
  entry = {'config': args.config, 'processes': args.processes, 'rows': rows, 'worst_s': worst}
  if args.processes > 1:
    entry['signal_process'] = args.signal_process % args.processes
  write(args.out, key, {**entry, 'load_average_end': os.getloadavg()[0]})


if __name__ == '__main__':
  main()
