"""What a run shows while it trains: this package's progress lines.

Progress, evaluations and the end of a run are absl `logging.info` lines.
A program that never parsed absl's flags (a script, a notebook) hides INFO
lines, and TensorFlow and tf_keras log their own INFO lines (one per
checkpoint save) through absl too. `progress_lines` shows the run's lines
and leaves those libraries' out while a run trains, then puts the absl
logger back as it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging as python_logging
import os
from typing import Iterator

from absl import logging


def _library_dirs() -> tuple[str, ...]:
  """The directories of the libraries whose INFO lines are not progress."""
  dirs = []
  for name in ("tensorflow", "tf_keras", "keras"):
    spec = importlib.util.find_spec(name)
    for location in (spec.submodule_search_locations or []) if spec else []:
      dirs.append(os.path.abspath(location) + os.sep)
  return tuple(dirs)


class _NoLibraryInfo(python_logging.Filter):
  """Drops INFO (and DEBUG) records of TensorFlow, tf_keras and Keras."""

  def __init__(self):
    super().__init__()
    self._dirs = _library_dirs()

  def filter(self, record: python_logging.LogRecord) -> bool:
    return (record.levelno >= python_logging.WARNING or
            not os.path.abspath(record.pathname).startswith(self._dirs))


@contextlib.contextmanager
def progress_lines(verbose: bool) -> Iterator[None]:
  """Shows (or hides) the run's INFO lines for the duration of a run.

  Only the absl logger's own level and filters change (not absl's
  verbosity flag, not the root logger), and both are restored on exit.

  Args:
    verbose: True: INFO lines through absl show, also where absl hides them
      (no absl flags parsed); those of TensorFlow, tf_keras and Keras are
      dropped unless absl asks for debug lines (`--v=1`). False: INFO lines
      through absl are hidden; warnings and errors still show.

  Yields:
    Nothing.
  """
  logger = logging.get_absl_logger()
  level = logger.level
  library_filter = None
  if not verbose:
    if logger.isEnabledFor(python_logging.INFO):
      logger.setLevel(python_logging.WARNING)
  else:
    if not logger.isEnabledFor(python_logging.INFO):
      logger.setLevel(python_logging.INFO)
    if not logger.isEnabledFor(python_logging.DEBUG):
      library_filter = _NoLibraryInfo()
      logger.addFilter(library_filter)
  try:
    yield
  finally:
    if library_filter is not None:
      logger.removeFilter(library_filter)
    logger.setLevel(level)
