"""What a run shows while it trains: this package's progress lines.

Progress, evaluations and the end of a run are absl `logging.info` lines.
A program that never parsed absl's flags (a script, a notebook) hides INFO
lines, and TensorFlow logs its own INFO lines (one per checkpoint save)
through absl too. `progress_lines` shows this package's and only those
while a run trains, and restores absl's verbosity afterwards.
"""

from __future__ import annotations

import contextlib
import logging as python_logging
import os
from typing import Iterator

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _PackageInfoOnly(python_logging.Filter):
  """Drops INFO (and DEBUG) records that did not come from this package."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return (record.levelno >= python_logging.WARNING or
            os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep))


@contextlib.contextmanager
def progress_lines(verbose: bool) -> Iterator[None]:
  """Shows (or hides) the run's INFO lines for the duration of a run.

  Args:
    verbose: True: this package's INFO lines are shown even where absl
      hides INFO (no absl flags parsed), and other libraries' INFO lines
      through absl are dropped unless absl's verbosity asks for debug lines
      (`--v=1`). False: INFO lines are hidden; warnings and errors still
      show.

  Yields:
    Nothing; absl's verbosity is restored on exit.
  """
  verbosity = logging.get_verbosity()
  package_filter = None
  if not verbose:
    logging.set_verbosity(min(verbosity, logging.WARNING))
  else:
    logging.set_verbosity(max(verbosity, logging.INFO))
    if verbosity < logging.DEBUG:
      package_filter = _PackageInfoOnly()
      logging.get_absl_logger().addFilter(package_filter)
  try:
    yield
  finally:
    if package_filter is not None:
      logging.get_absl_logger().removeFilter(package_filter)
    logging.set_verbosity(verbosity)
