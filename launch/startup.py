"""How every launcher starts TensorFlow, and what it does after an error.

A launcher imports no TensorFlow until its flags are parsed and checked:
its main calls `import_tensorflow_quietly` first thing, so a typo or a bad
value fails at once, not after TensorFlow's start-up (seconds, or a minute
on a loaded machine).

TensorFlow's C++ runtime writes start-up lines straight to stderr: an
oneDNN notice and "Could not find cuda drivers" while it is imported
(before its log settings apply), and a "failed call to cuInit" error on
every host without an NVIDIA driver. None is for the user of a launcher;
they are dropped, and TensorFlow's C++ INFO and WARNING lines after them
are hidden (its errors still show). Setting TF_CPP_MIN_LOG_LEVEL yourself
(e.g. to 0) shows them all again.

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
from typing import Any, Callable

# Set by the first launcher that hides the lines, so that the processes it
# starts (mtl-local-cluster's workers) hide them too, although they inherit
# a TF_CPP_MIN_LOG_LEVEL the user did not set.
_QUIET_MARK = "MTL_DIST_QUIET_TF_STARTUP"
# While TensorFlow is imported: glog's INFO and WARNING lines (`I0000 ...`,
# `W...`; oneDNN, "Could not find cuda drivers", TensorRT) and absl's note
# on logging before it is set up. Errors and anything else pass.
_IMPORT_CHATTER = (rb"[IW]\d{4} |"
                   rb"WARNING: All log messages before absl::InitializeLog")
# While it first lists the devices: INFO lines.
_DEVICE_CHATTER = rb"I\d{4} "
# In either, on a host without an NVIDIA driver, the cuInit error (on a host
# with one, it is the error to see).
_NO_DRIVER_CHATTER = rb"|E\d{4} .*failed call to cuInit"


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow, keeping its C++ start-up lines off stderr.

  Unless the user set TF_CPP_MIN_LOG_LEVEL, TensorFlow's C++ INFO and
  WARNING lines are hidden from then on (level 2: errors still show), and
  the lines it writes before that level applies (while it is imported and
  first lists the devices) are filtered: the chatter above is dropped,
  everything else (Python warnings, errors) is passed on.
  """
  if "tensorflow" in sys.modules:
    return
  if ("TF_CPP_MIN_LOG_LEVEL" in os.environ and
      os.environ.get(_QUIET_MARK) != "1"):  # The user asked for them.
    importlib.import_module("tensorflow")
    return
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
  os.environ[_QUIET_MARK] = "1"
  extra = b"" if os.path.exists("/dev/nvidiactl") else _NO_DRIVER_CHATTER
  tf = _filtered(re.compile(rb"^(" + _IMPORT_CHATTER + extra + rb")"),
                 lambda: importlib.import_module("tensorflow"))
  _filtered(re.compile(rb"^(" + _DEVICE_CHATTER + extra + rb")"),
            tf.config.list_physical_devices)


def _filtered(chatter: re.Pattern[bytes], call: Callable[[], Any]) -> Any:
  """`call()`, dropping the lines it writes to stderr that match `chatter`.

  The lines are collected in a file and passed on when `call` returns or
  raises. Where stderr is no file descriptor, `call` runs unfiltered.
  """
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # No fd 2.
    return call()
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      return call()
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured:
        if not chatter.match(line):
          os.write(2, line)


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
