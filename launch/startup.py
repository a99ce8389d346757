"""How every launcher starts TensorFlow, and what it does after an error.

A launcher imports no TensorFlow until its flags are parsed and checked:
its main calls `import_tensorflow_quietly` first thing, so a typo or a bad
value fails at once, not after TensorFlow's start-up (seconds, or a minute
on a loaded machine).

TensorFlow's C++ runtime writes start-up lines straight to stderr: an
oneDNN notice and "Could not find cuda drivers" while it is imported
(before its log settings apply), and a "failed call to cuInit" error on
every host without a GPU. None is for the user of a launcher; setting
TF_CPP_MIN_LOG_LEVEL yourself (e.g. to 0) shows them all again.

And after a launcher's one error line, nothing else: objects torn down at
exit (a checkpoint that was never restored, a strategy) log warnings that
would bury it.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import tempfile
from typing import Callable

# Start-up lines of TensorFlow's C++ runtime: glog's INFO and WARNING
# (`I0000 00:00:...`, `W...`) and absl's note on logging before it is set up.
_STARTUP_LINE = re.compile(
    rb"^([IW]\d{4} |WARNING: All log messages before absl::InitializeLog)")


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow, keeping its C++ start-up lines off stderr.

  Lines it writes while importing are dropped unless the user set
  TF_CPP_MIN_LOG_LEVEL; anything else written meanwhile (Python warnings,
  errors) is passed on. Hides C++ log lines below FATAL from then on too,
  unless the user set TF_CPP_MIN_LOG_LEVEL.
  """
  if "tensorflow" in sys.modules:
    return
  if "TF_CPP_MIN_LOG_LEVEL" in os.environ:  # The user asked for them.
    importlib.import_module("tensorflow")
    return
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      importlib.import_module("tensorflow")
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured:
        if not _STARTUP_LINE.match(line):
          sys.stderr.buffer.write(line)
      sys.stderr.flush()


def run(main: Callable[[list[str]], None],
        flags_parser: Callable[[list[str]], list[str]], doc: str) -> None:
  """`absl.app.run(main)`, with nothing written after an error's line.

  Args:
    main: The launcher's main.
    flags_parser: Its flags parser (`cli.flags_parser`).
    doc: The launcher's docstring, which --help shows above the flags (a
      console script's own module has none).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  main_module = sys.modules["__main__"]
  if not main_module.__doc__:
    main_module.__doc__ = doc
  try:
    app.run(main, flags_parser=flags_parser)
  except SystemExit as e:
    if e.code not in (None, 0):
      _silence()
    raise


def _silence() -> None:
  """Sends whatever is written from now on (teardown at exit) nowhere."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.disable(logging.CRITICAL)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
