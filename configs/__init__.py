"""Run configs, one per file (`get_config()`), loaded by main.py's --config=configs/<name>.py.

A variant config takes the base config it modifies after ':', as in
--config=configs/ganomaly.py:demo; `load_base` loads that base.
"""

import importlib


def load_base(variant: str, base: str):
  """configs/<base>.py's config, for the variant configs/<variant>.py:<base>.

  Raises:
    ValueError: configs/ has no config named `base` (the message names the variant).
    ModuleNotFoundError: the base exists but imports something missing (its own error).
  """
  try:
    module = importlib.import_module(f'configs.{base}')
  except ModuleNotFoundError as error:
    if error.name != f'configs.{base}':
      raise  # The base exists but needs something missing: its own error says what.
    raise ValueError(
      f'configs/{variant}.py:{base}: no config named {base!r} in configs/ (use e.g. '
      f'configs/{variant}.py:cifar10_arrays or configs/{variant}.py:demo).'
    ) from error
  return module.get_config()
