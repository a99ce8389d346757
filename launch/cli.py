"""What the launchers share: one-line errors with their exit status."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import flags


def fail(program: str, message: str, status: int = 2) -> NoReturn:
  """Writes `<program>: error: <message>` to stderr and exits `status`."""
  sys.stderr.write(f"{program}: error: {message}\n")
  sys.exit(status)


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` that exits 2 with one line on a bad flag.

  absl's own parser exits 1 with the usage text; a bad flag is a
  configuration error (status 2).
  """

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(program, str(e))

  return parse
