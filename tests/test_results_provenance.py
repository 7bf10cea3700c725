"""Every published result traces to the code that produced it.

Each JSON under benchmarks/results records, at its top level, the git commit and the
command that wrote it (benchmarks/provenance.py; files from before that carry them
retroactively, with a "provenance_note"), and every markdown table there has its JSON
beside it (`<name>.json` for `<name>.md`; any JSON in the folder for a README.md). Reads
the files only: no git needed (CI runs on a clean clone, history or not).
"""

import itertools
import json
import pathlib
import re

import pytest

RESULTS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
COMMIT = re.compile(r'[0-9a-f]{7,40}(-dirty)?')
TABLE_ROW = re.compile(r'^\s*\|.*\|\s*$')
TABLE_RULE = re.compile(r'^\s*\|(\s*:?-+:?\s*\|)+\s*$')

JSONS = sorted(RESULTS.rglob('*.json'))
MARKDOWNS = sorted(RESULTS.rglob('*.md'))


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(RESULTS))


def _has_table(text: str) -> bool:
  lines = text.splitlines()
  return any(TABLE_ROW.match(a) and TABLE_RULE.match(b) for a, b in itertools.pairwise(lines))


def test_results_exist():
  assert JSONS, f'no results JSON under {RESULTS}'


@pytest.mark.parametrize('path', JSONS, ids=_name)
def test_json_records_commit_and_command(path):
  data = json.loads(path.read_text())
  assert isinstance(data, dict), f'{_name(path)}: the top level must be an object'
  commit, command = data.get('commit'), data.get('command')
  assert isinstance(commit, str) and COMMIT.fullmatch(commit), (
    f'{_name(path)}: "commit" must be a git hash (7-40 hex digits, optional -dirty), '
    f'got {commit!r}; write it with benchmarks/provenance.py'
  )
  assert isinstance(command, str) and command.strip(), f'{_name(path)}: empty "command"'
  stale = data.get('stale')
  if stale is not None:
    assert isinstance(stale, str) and 'rerun with:' in stale, (
      f'{_name(path)}: "stale" must say how to rerun it, got {stale!r}'
    )


@pytest.mark.parametrize('path', MARKDOWNS, ids=_name)
def test_markdown_table_has_json_beside_it(path):
  if not _has_table(path.read_text()):
    return
  if path.name == 'README.md':
    beside = sorted(path.parent.glob('*.json'))
  else:
    beside = [p for p in [path.with_suffix('.json')] if p.exists()]
  assert beside, f'{_name(path)}: a markdown table without its JSON beside it'
