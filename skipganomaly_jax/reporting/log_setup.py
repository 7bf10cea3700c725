"""What a run prints by default: our progress bar and messages; other libraries' warnings.

Orbax logs about 60 INFO lines per checkpoint (option dumps, thread names, throughput)
through absl, as do other libraries; by default only INFO records from this package and
from the main script are shown, and everything at WARNING or above. An explicit
`--verbosity` (or `-v`) shows everything, as absl normally does.
"""

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

# The package root (this file is in its reporting/ subpackage).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class OwnInfoOnly(logging.Filter):
  """Passes records at WARNING and above, and lower ones from our own files only."""

  def __init__(self, own_files: tuple[str, ...] = ()):
    super().__init__()
    self._files = {os.path.abspath(f) for f in own_files}

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_PACKAGE_DIR) or path in self._files


def quiet_library_logs() -> OwnInfoOnly | None:
  """Filters other libraries' INFO logs out of absl's handler, unless --verbosity was set.

  Call after absl parsed the flags (in `main`). Returns the filter installed, or None.
  """
  if flags.FLAGS['verbosity'].present:
    return None
  main_file = getattr(sys.modules.get('__main__'), '__file__', None)
  own = OwnInfoOnly((main_file,) if main_file else ())
  absl_logging.get_absl_handler().addFilter(own)
  return own
