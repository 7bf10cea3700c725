"""Shared test fixtures: small configs built from configs/default.py."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str = 'default'):
  """Loads configs/<name>.py's get_config() without touching sys.path globally."""
  path = ROOT / 'configs' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture
def tiny_config():
  """Default config with a tiny model (ngf=ndf=8, nz=16), 32x32x3."""
  config = load_config('default')
  config.model.ngf, config.model.ndf, config.model.nz = 8, 8, 16
  config.nc = 3
  return config
