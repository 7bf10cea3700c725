"""The package's layer rule, read from the import graph of its source files.

Layers, lowest first (a module imports only from lower layers or its own package):

  0 config/, parallel.py            every allowed value and check, the specs; the device mesh
  1 data/, nets/                    input, networks (neither imports the other)
  2 scoring/                        scores, metrics, calibration, localisation
  3 reporting/                      outputs, plots, overlays, logs
  4 training/                       losses, the step, the loop, checkpoints
  5 deploy/                         loading runs, export, reference weights
  6 the package's entry points      __init__.py, prepare_data.py, import_reference.py

Reporting sits below training because the training loop writes its reports. No private
name (`_x`) is imported or used across packages. Lazy imports inside functions count too.
"""

import ast
import pathlib

import pytest

PACKAGE = 'skipganomaly_jax'
SOURCE = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
LAYERS = {
  'config': 0,
  'parallel': 0,
  'data': 1,
  'nets': 1,
  'scoring': 2,
  'reporting': 3,
  'training': 4,
  'deploy': 5,
  '__init__': 6,
  'prepare_data': 6,
  'import_reference': 6,
}


def unit_of(module: str) -> str:
  """'skipganomaly_jax.scoring.scores' -> 'scoring'; the package itself -> '__init__'."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else '__init__'


def module_name(path: pathlib.Path, source_root: pathlib.Path = SOURCE) -> str:
  parts = path.relative_to(source_root.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: pathlib.Path) -> list[tuple[str, str, int]]:
  """(imported module, imported name or '', line) of every package import in a file.

  `from skipganomaly_jax.x import y` gives ('skipganomaly_jax.x.y', 'y') when y is a
  module and ('skipganomaly_jax.x', 'y') otherwise; attribute uses `alias._name` of an
  imported module are listed as names too.
  """
  tree = ast.parse(path.read_text(), str(path))
  found, aliases = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split('.')[0] == PACKAGE:
          found.append((a.name, '', node.lineno))
          aliases[(a.asname or a.name).split('.')[0]] = a.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module.split('.')[0] != PACKAGE:
        continue
      for a in node.names:
        sub = f'{node.module}.{a.name}'
        is_module = (SOURCE.parent / sub.replace('.', '/')).with_suffix('.py').exists() or (
          SOURCE.parent / sub.replace('.', '/') / '__init__.py'
        ).exists()
        found.append((sub, '', node.lineno) if is_module else (node.module, a.name, node.lineno))
        if is_module:
          aliases[a.asname or a.name] = sub
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith('_')
      and not node.attr.startswith('__')
    ):
      found.append((aliases[node.value.id], node.attr, node.lineno))
  return found


def violations(source_root: pathlib.Path = SOURCE) -> list[str]:
  """Every backwards import and every private name crossing a package boundary."""
  problems = []
  for path in sorted(source_root.rglob('*.py')):
    importer = module_name(path, source_root)
    here = unit_of(importer)
    for target, name, line in imports_of(path):
      there = unit_of(target)
      where = f'{path.relative_to(source_root.parent)}:{line}'
      if there != here and LAYERS[there] >= LAYERS[here]:
        problems.append(
          f'{where}: {here} (layer {LAYERS[here]}) imports {target} ({there}, layer '
          f'{LAYERS[there]}); a module may import only from lower layers'
        )
      if name.startswith('_') and there != here:
        problems.append(f'{where}: private name {target}.{name} used outside {there}/')
  return problems


def test_every_unit_has_a_layer():
  units = {unit_of(module_name(p)) for p in SOURCE.rglob('*.py')}
  assert units <= set(LAYERS), f'modules without a layer: {units - set(LAYERS)}'


def test_imports_flow_down_the_layers_and_keep_private_names_private():
  assert violations() == []


@pytest.mark.parametrize(
  'file, line, message',
  [
    ('scoring/bad.py', 'from skipganomaly_jax.training import train', 'scoring (layer 2)'),
    ('nets/bad.py', 'from skipganomaly_jax.data import images', 'nets (layer 1)'),
    ('config/fields.py', 'from skipganomaly_jax.scoring import localisation', 'config (layer 0)'),
    ('deploy/bad.py', 'from skipganomaly_jax.scoring.scores import _x', 'private name'),
    ('deploy/bad.py', 'from skipganomaly_jax.scoring import scores\nscores._y', 'private name'),
  ],
)
def test_a_backwards_or_private_import_is_caught(tmp_path, file, line, message):
  copy = tmp_path / PACKAGE
  for path in SOURCE.rglob('*.py'):
    target = copy / path.relative_to(SOURCE)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(path.read_text())
  bad = copy / file
  bad.write_text((bad.read_text() if bad.exists() else '') + f'\n{line}\n')
  found = violations(copy)
  assert any(message in p for p in found), found
