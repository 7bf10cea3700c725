"""Shared test fixtures: small configs, a persistent XLA compilation cache, fast compiles.

Compiling the networks dominates test time on CPU (the tests run few steps of tiny
models). The cache (shared with the subprocesses the tests start, through the
environment) compiles each program once; XLA's CPU backend optimisation level 0 compiles
about 3x faster, and its loop emitters instead of the newer fusion emitters about 3x
faster again (the train step: the same step time). Both change code generation, not the
computation.
"""

import dataclasses
import fcntl
import importlib.util
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import zlib
from importlib.metadata import version

FAST_COMPILE = '--xla_backend_optimization_level=0'
if version('jax').startswith('0.10.'):  # XLA aborts on a flag it does not know: only the
  FAST_COMPILE += ' --xla_cpu_use_fusion_emitters=false'  # XLA it was measured with.
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE}'.strip()

import jax  # noqa: E402  (after XLA_FLAGS: read when the backend starts)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'skipganomaly_jax_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

TINY = {'model.ngf': 8, 'model.ndf': 8, 'model.nz': 16}


def load_config(name: str = 'default'):
  """Loads configs/<name>.py's get_config()."""
  path = ROOT / 'configs' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'configs.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny(config):
  """Shrinks a config's model to the tiny test widths, in place."""
  config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  return config


@pytest.fixture
def tiny_config():
  """Default config with a tiny model (ngf=ndf=8, nz=16), 32x32x3."""
  config = tiny(load_config('default'))
  config.nc = 3
  return config


# ------------------------------------------------------------------------------ seeds
# Every random test draws from a seeded generator. The seed is fixed per test (derived
# from its name, so runs are reproducible) unless TEST_SEED=<int> overrides it (to
# explore other inputs), and it is printed in the report of a failing test.


def test_seed(request) -> int:
  """The seed of the running test: $TEST_SEED, else a hash of the test's name."""
  seed = os.environ.get('TEST_SEED')
  seed = int(seed) if seed else zlib.crc32(request.node.nodeid.encode())
  request.node.stash[SEED_KEY] = seed
  return seed


SEED_KEY = pytest.StashKey[int]()
test_seed.__test__ = False  # A helper, not a test.


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A numpy Generator seeded with `test_seed` (reported if the test fails)."""
  return np.random.default_rng(test_seed(request))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Adds 'random seed: S (rerun with TEST_SEED=S)' to a failing test's report."""
  outcome = yield
  report = outcome.get_result()
  if report.failed and SEED_KEY in item.stash:
    seed = item.stash[SEED_KEY]
    report.sections.append(('random seed', f'{seed} (rerun with TEST_SEED={seed})'))


# ------------------------------------------------------------------------------ order
# pytest-xdist hands each worker whole test files (--dist=loadfile), in collection order
# (--no-loadscope-reorder). The slowest files (measured with --durations; each mostly
# compiles its programs) go first, so that none of them starts last and keeps one worker
# busy while the others have finished. Files not listed follow, in name order.
SLOW_FILES_FIRST = (
  'test_multidevice.py',
  'test_multiprocess.py',
  'test_run_modes.py',
  'test_train_step.py',
  'test_main.py',
  'test_scoring.py',
  'test_one_truth.py',
  'test_preemption.py',
  'test_outputs_named.py',
  'test_models.py',
  'test_maps_and_contract.py',
  'test_localisation.py',
  'test_import_reference.py',
  'test_reference_parity.py',
  'test_export.py',
  'test_ganomaly_step.py',
  'test_layers.py',
)


def pytest_collection_modifyitems(items):
  """Runs the files of SLOW_FILES_FIRST first, in that order (a stable sort: each file's
  tests keep their order)."""
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def progress_bars(monkeypatch):
  """The tqdm progress bars that training creates (kept alive, so a bar that is never
  closed stays open instead of being closed by garbage collection); `bar.closed`."""
  import tqdm  # noqa: PLC0415

  from skipganomaly_jax.training import train  # noqa: PLC0415

  bars = []

  class Recorded(tqdm.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.closed = False
      bars.append(self)

    def close(self):
      self.closed = True
      super().close()

  monkeypatch.setattr(train.tqdm, 'tqdm', Recorded)
  return bars


# ------------------------------------------------------------------------------ shared runs


def built_once(tmp_path_factory, name: str, build):
  """What `build(directory)` returns, built once per test session, however many workers.

  Under pytest-xdist each worker process has its own session fixtures, so a run that
  tests in several files use would be trained once per worker. Here the first worker to
  ask builds it in `directory`, under the base temporary directory that all workers of
  the session share (a file lock makes the others wait), and every worker reads the
  picklable value `build` returned. Without xdist it is an ordinary session fixture.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # The workers' basetemps are popen-gw0, popen-gw1, ... under it.
  directory, done = base / f'built_once_{name}', base / f'built_once_{name}.pickle'
  with open(base / f'built_once_{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, even on an error.
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)  # A build that failed in another worker.
      directory.mkdir()
      done.write_bytes(pickle.dumps(build(directory)))
  return pickle.loads(done.read_bytes())


def private_copy(tmp_path_factory, workdir: pathlib.Path, name: str) -> pathlib.Path:
  """A copy of a shared run's workdir for this worker: tests write into their run (exports,
  score CSVs), and workers run at the same time."""
  copy = tmp_path_factory.mktemp(name)
  shutil.copytree(workdir, copy, dirs_exist_ok=True)
  return copy


# The few small training runs that many tests use are trained once per session (below),
# on DIGITS: 500 of the offline MNIST digits (50 of each, seeded) in an .npz read by the
# 'arrays' source, with GANomaly's protocol and digit 0 abnormal as in configs/demo.py.
# The tests about the 5,000 digits themselves (test_input_pipeline.py) read them all.
# Splits: 450 normals -> 360 train (18 of them validation) + 90 normal test; 50 zeros.

DIGITS_PER_CLASS = 50
DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
DIGITS_TRAIN, DIGITS_VAL, DIGITS_TEST_NORMAL, DIGITS_TEST_ABNORMAL = 342, 18, 90, 50

# The command-line run (`cli_run`): EPOCHS of STEPS steps of batches of 16 (21 per epoch,
# so the preemption tests can stop one mid-epoch), metrics logged every step, evaluation
# in batches of 64 (the last one padded).
CLI_EPOCHS, CLI_STEPS = 2, 20


@pytest.fixture(scope='session')
def digits_npz(tmp_path_factory) -> str:
  """Path of the DIGITS .npz: images (500, 32, 32, 1) uint8 (the offline digits as the
  'mnist_offline' source makes them), labels, class_names 'zero'..'nine'."""
  return built_once(tmp_path_factory, 'digits', write_digits)


def write_digits(directory: pathlib.Path) -> str:
  """Writes DIGITS to directory/digits.npz; returns its path."""
  from skipganomaly_jax.data import sources  # noqa: PLC0415

  pool = sources.mnist_offline_pool(32, 1, seed=0)
  rng = np.random.default_rng(0)
  keep = np.sort(
    np.concatenate(
      [
        rng.choice(np.flatnonzero(pool.labels == c), DIGITS_PER_CLASS, replace=False)
        for c in range(10)
      ]
    )
  )
  path = directory / 'digits.npz'
  np.savez(
    path, images=pool.images[keep], labels=pool.labels[keep], class_names=np.array(DIGIT_NAMES)
  )
  return str(path)


def digits_config(npz: str, name: str = 'demo'):
  """configs/<name>.py with the tiny model, reading DIGITS from `npz` (the `digits_npz`)."""
  config = tiny(load_config(name))
  config.dataset.name, config.dataset.path = 'arrays', npz
  return config


def main_cmd(workdir, *flags, config: str = 'configs/demo.py') -> list[str]:
  """The command line of main.py (run with cwd=ROOT)."""
  return [
    sys.executable,
    str(ROOT / 'main.py'),
    f'--config={config}',
    f'--workdir={workdir}',
    *flags,
  ]


def main_in_process(*args):
  """Runs main.py's `main` in this process on the command line `args`, for the checks that
  need no process of their own. The flags are parsed as `app.run` parses them (main.py's
  `parse_flags`), but a flag error raises its `absl.flags.Error` instead of printing the
  usage and exiting; usage errors raise `absl.app.UsageError`. Returns what `main` returns."""
  from unittest import mock  # noqa: PLC0415

  from absl import app, flags  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  import main  # noqa: PLC0415  (ROOT/main.py: defines its flags once per process)

  argv = [str(ROOT / 'main.py'), *map(str, args)]
  saved_argv, handler = sys.argv, absl_logging.get_absl_handler()
  saved_filters = list(handler.filters)
  sys.argv = argv  # The config flag reads its --config.* overrides from sys.argv.
  try:
    with mock.patch.object(app, 'parse_flags_with_usage', flags.FLAGS):
      argv = getattr(main, 'parse_flags', flags.FLAGS)(argv)
    return main.main(argv)
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
    handler.filters[:] = saved_filters  # main() filters the libraries' logs out.


@dataclasses.dataclass(frozen=True)
class CliRun:
  """A run trained through main.py: its workdir, the training flags (the same command
  resumes or repeats it) and the training's stderr."""

  workdir: pathlib.Path
  flags: tuple[str, ...]
  stderr: str


@pytest.fixture(scope='session')
def cli_run(tmp_path_factory, digits_npz) -> CliRun:
  """The tiny paper-score run trained through `python main.py` (CLI_EPOCHS x CLI_STEPS)
  on DIGITS: test_main.py's outputs, kill -9 and modes, test_preemption.py's
  uninterrupted run, test_export.py's paper-score detector."""
  flags = tuple(f'--config.{k}={v}' for k, v in TINY.items()) + (
    '--config.dataset.name=arrays',
    f'--config.dataset.path={digits_npz}',
    f'--config.num_epochs={CLI_EPOCHS}',
    f'--config.max_steps_per_epoch={CLI_STEPS}',
    '--config.batch_size=16',
    '--config.log_every_steps=1',
    '--config.eval_batch_size=64',
  )

  def train(workdir):
    proc = subprocess.run(
      main_cmd(workdir, *flags), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'AUROC' in proc.stdout and str(workdir) in proc.stdout
    return CliRun(workdir, flags, proc.stderr)

  run = built_once(tmp_path_factory, 'cli_run', train)
  return dataclasses.replace(run, workdir=private_copy(tmp_path_factory, run.workdir, 'cli_run'))


@dataclasses.dataclass(frozen=True)
class InProcessRun:
  """A run trained by `train.train_and_evaluate` in this process."""

  workdir: pathlib.Path
  config: object
  report: dict


@pytest.fixture(scope='session')
def knn_run(tmp_path_factory, digits_npz) -> InProcessRun:
  """The tiny latent k-NN run (1 epoch of 2 steps) on DIGITS, trained in process:
  test_main.py's stored bank, test_export.py's latent k-NN detector, test_arrays_source.py's
  end-to-end run of the arrays source."""
  from skipganomaly_jax.training import train  # noqa: PLC0415

  config = digits_config(digits_npz)
  config.score_kind = 'latent_knn'
  config.num_epochs, config.max_steps_per_epoch = 1, 2
  run = built_once(
    tmp_path_factory,
    'knn_run',
    lambda workdir: InProcessRun(workdir, config, train.train_and_evaluate(config, str(workdir))),
  )
  return dataclasses.replace(run, workdir=private_copy(tmp_path_factory, run.workdir, 'knn_run'))


@pytest.fixture(scope='session')
def ganomaly_run(tmp_path_factory, digits_npz) -> InProcessRun:
  """The tiny GANomaly run (model.name = 'ganomaly', widths 8, nz 16, latent k-NN, 1 epoch
  of 2 steps) on DIGITS, trained in process: test_ganomaly_run.py's end-to-end checks,
  test_one_truth.py's GANomaly networks."""
  from skipganomaly_jax.training import train  # noqa: PLC0415

  config = digits_config(digits_npz)
  config.model.name, config.score_kind = 'ganomaly', 'latent_knn'
  config.num_epochs, config.max_steps_per_epoch = 1, 2
  run = built_once(
    tmp_path_factory,
    'ganomaly_run',
    lambda workdir: InProcessRun(workdir, config, train.train_and_evaluate(config, str(workdir))),
  )
  return dataclasses.replace(
    run, workdir=private_copy(tmp_path_factory, run.workdir, 'ganomaly_run')
  )


def run_json(cmd: list, env: dict, cwd=ROOT, timeout: int = 300) -> dict:
  """Runs the command `cmd` (a subprocess), which must exit 0 (else its stderr's end is
  the failure message); returns the JSON object its last printed line holds."""
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_isolated(code: str, cwd) -> dict:
  """Runs `code` in a fresh interpreter that cannot import this repository (-I, no
  PYTHONPATH), in `cwd`; returns the JSON object its last printed line holds."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return run_json([sys.executable, '-I', '-c', code], env, cwd=cwd)
