"""Seconds from SIGTERM to exit of a training run (main.py), at several moments of a run.

    python benchmarks/preemption_latency.py [--config=configs/demo.py] [--repeats=1]

Each scenario starts a fresh run of --config (default: the offline demo with the paper's
model, ngf=ndf=64), waits for its moment, sends SIGTERM and times the exit. Moments:
- 'startup': 2 s after the first log line (data loading, initialisation);
- 'first step': at the 'Training from step' line, while the first step compiles;
- 'training': right after the first logged training step (step 10 of the demo);
- 'evaluation start': right after the last training step is logged, while the
  evaluation functions compile;
- 'evaluation': 6 s later, while the k-NN bank is being scored.
No compilation cache (a fresh run compiles everything). Prints a table and writes JSON.

    python benchmarks/preemption_latency.py --allgather_processes=2

instead times the check of a multi-process run (an all-gather of the flags, as
`PreemptionFlag.requested` does) in that many CPU processes on this machine.
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


def one(config: str, moment: str, delay: float, base: pathlib.Path, last_step: int) -> dict:
  """Runs main.py until `moment` + `delay`, sends SIGTERM, returns the timings."""
  workdir, log = base / 'run', base / 'stderr.txt'
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  cmd = [sys.executable, str(ROOT / 'main.py'), f'--config={config}', f'--workdir={workdir}']
  with open(log, 'w') as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
  start = time.perf_counter()
  try:
    while not reached(moment, workdir, log, last_step):
      if proc.poll() is not None:
        raise RuntimeError(f'the run ended before {moment}:\n{log.read_text()[-2000:]}')
      time.sleep(0.05)
    time.sleep(delay)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=600)
    seconds = time.perf_counter() - sent
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  text = log.read_text()
  saved = [
    line.split('saved step ')[1].split(';')[0]
    for line in text.split('\n')
    if 'Preempted: saved step' in line
  ]
  return {
    'since_start_s': round(sent - start, 1),
    'signal_to_exit_s': round(seconds, 2),
    'exit_code': rc,
    'saved_step': int(saved[-1]) if saved else None,
  }


def _allgather_worker(port: int, count: int, index: int, calls: int) -> None:
  """One process of the all-gather timing: prints the mean seconds per check."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  jax.config.update('jax_platforms', 'cpu')
  jax.distributed.initialize(f'127.0.0.1:{port}', count, index, initialization_timeout=120)
  multihost_utils.process_allgather(np.int32(0))  # Compiles.
  start = time.perf_counter()
  for _ in range(calls):
    multihost_utils.process_allgather(np.int32(0)).max()
  print(json.dumps({'process': index, 'seconds_per_check': (time.perf_counter() - start) / calls}))


def time_allgather(processes: int, calls: int = 200) -> list[float]:
  """Seconds per flag check in each of `processes` CPU processes."""
  port = 20000 + os.getpid() % 20000
  code = (
    f'import sys; sys.path.insert(0, {str(ROOT / "benchmarks")!r}); '
    'import preemption_latency as p; p._allgather_worker(*map(int, sys.argv[1:]))'
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
  return [json.loads(o.strip().split('\n')[-1])['seconds_per_check'] for o in outs]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--last_step', type=int, default=53, help="the config's steps per epoch")
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/preemption_latency.json'))
  parser.add_argument('--allgather_processes', type=int, default=0)
  parser.add_argument('--moments', default='', help='comma-separated subset of the moments')
  args = parser.parse_args()
  if args.allgather_processes:
    per_check = time_allgather(args.allgather_processes)
    print(f'all-gather check: {", ".join(f"{s * 1e3:.2f} ms" for s in per_check)} per process')
    return
  rows = []
  wanted = set(args.moments.split(',')) if args.moments else {name for name, _, _ in SCENARIOS}
  for name, moment, delay in (s for s in SCENARIOS if s[0] in wanted):
    for _ in range(args.repeats):
      with tempfile.TemporaryDirectory() as base:
        row = {
          'moment': name,
          **one(args.config, moment, delay, pathlib.Path(base), args.last_step),
        }
      rows.append(row)
      print(row, flush=True)
  print(
    f'\n{"moment":<18} {"since start s":>13} {"signal->exit s":>15} {"exit":>5} {"saved step":>10}'
  )
  for r in rows:
    print(
      f'{r["moment"]:<18} {r["since_start_s"]:>13} {r["signal_to_exit_s"]:>15} '
      f'{r["exit_code"]:>5} {str(r["saved_step"]):>10}'
    )
  worst = max(r['signal_to_exit_s'] for r in rows)
  print(f'worst case: {worst:.1f} s ({os.cpu_count()} CPU cores)')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(
      {'config': args.config, 'cpu_count': os.cpu_count(), 'rows': rows, 'worst_s': worst},
      f,
      indent=2,
    )


if __name__ == '__main__':
  main()
