"""What the launchers share: one-line errors with their exit status.

No TensorFlow here: a launcher parses and checks its flags first, and
imports TensorFlow in its main (`startup.import_tensorflow_quietly`); the
functions below that name TensorFlow's errors run after that.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, NoReturn

from absl import flags

from mtl_dist import errors
from mtl_dist.run import config as config_lib

_HELP_FLAGS = {"--help", "-help", "--helpfull", "-helpfull", "--helpshort",
               "-helpshort", "--helpxml", "-helpxml", "-?", "-h"}


def fail(program: str, message: str, status: int = 2) -> NoReturn:
  """Writes `<program>: error: <message>` to stderr and exits `status`."""
  sys.stderr.write(f"{program}: error: {message}\n")
  sys.exit(status)


def runtime_failure(error: BaseException) -> str:
  """One line for a failure while running: a file or TensorFlow error."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtl_dist.run import failures  # pylint: disable=g-import-not-at-top
  if isinstance(error, tf.errors.OpError):  # Past "Graph execution error:".
    return f"{type(error).__name__}: {failures.reason(error)}"
  lines = str(error).strip().splitlines() or [""]
  return f"{type(error).__name__}: {lines[0][:300]}"


@contextlib.contextmanager
def library_errors(program: str) -> Iterator[None]:
  """Turns what a library call raises into one line and an exit status.

  A ConfigError (bad flags, files or data found before any work) exits 2; a
  file system or TensorFlow error while running exits 1.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    yield
  except errors.ConfigError as e:
    fail(program, str(e))
  except (tf.errors.OpError, OSError) as e:  # Files, data, checkpoints.
    fail(program, runtime_failure(e), status=1)


def refuse_arguments(program: str, argv: list[str]) -> None:
  """Exits 2 if positional arguments follow the flags (absl leaves them)."""
  if len(argv) > 1:
    fail(program, f"unexpected arguments: {' '.join(argv[1:])}")


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` that exits 2 with one line on a bad flag.

  absl's own parser exits 1 with the usage text; a bad flag is a
  configuration error (status 2). Asking for help (--help, --helpfull)
  exits 0, not absl's 1.
  """

  def parse(argv: list[str]) -> list[str]:
    _show_in_help(argv[0])
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      fail(program, str(e))
    except SystemExit as e:  # absl exits 1 after printing the help.
      if e.code == 1 and _HELP_FLAGS.intersection(argv[1:]):
        sys.exit(0)
      raise
    _check_numbers(program)
    return rest

  return parse


def _show_in_help(program_path: str) -> None:
  """Makes --help list the launcher's own flags.

  absl's --help shows the key flags of the module `sys.argv[0]` names; a
  console script (`mtl-train`) is a wrapper that defines none, so the
  launcher's flags would appear only in --helpfull, among absl's and
  TensorFlow's.
  """
  for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("launch.") or module == program_path:
      for flag in module_flags:
        flags.FLAGS.register_key_flag_for_module(program_path, flag)


def _check_numbers(program: str) -> None:
  """Exits 2 for a given number flag that is NaN, infinite or too large.

  absl's bounds let NaN through (no comparison with it is true); no count
  of this package's fits past an int32, and no float setting means
  anything past 1e6 (see docs/flags.md).
  """
  for module_flags in flags.FLAGS.flags_by_module_dict().values():
    for item in module_flags:
      if not item.present or item.value is None:
        continue
      values = item.value if isinstance(item.value, list) else [item.value]
      for value in values:
        if isinstance(value, float) and not abs(value) <= config_lib.MAX_FLOAT:
          fail(program, f"--{item.name}={value}: must be a finite number of "
               f"magnitude at most {config_lib.MAX_FLOAT:g}")
        if (isinstance(value, int) and not isinstance(value, bool) and
            abs(value) > config_lib.MAX_INT):
          fail(program, f"--{item.name}={value}: must be at most "
               f"{config_lib.MAX_INT} in magnitude")
