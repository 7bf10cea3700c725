"""Shared test fixtures: small configs, a persistent XLA compilation cache, fast compiles.

Compiling the networks dominates test time on CPU (the tests run few steps of tiny
models). The cache (shared with the subprocesses the tests start, through the
environment) compiles each program once, and XLA's CPU backend optimisation level 0
compiles about 3x faster; it changes code generation, not the computation.
"""

import importlib.util
import os
import pathlib
import tempfile
import zlib

FAST_COMPILE = '--xla_backend_optimization_level=0'
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
