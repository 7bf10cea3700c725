"""The commit and the command that produced a results file, for every benchmark's JSON."""

import pathlib
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def commit() -> str:
  """HEAD's hash, with '-dirty' when tracked files differ from it ('unknown' outside git)."""
  try:
    head = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'
  return f'{head}-dirty' if dirty else head


def provenance() -> dict:
  """{'commit': ..., 'command': the command line of this process}."""
  command = ' '.join(shlex.quote(a) for a in [pathlib.Path(sys.executable).name, *sys.argv])
  return {'commit': commit(), 'command': command}
