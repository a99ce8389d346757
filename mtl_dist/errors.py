"""How a run ends early: the package's exceptions, at the bottom of its layers.

Every module raises these and nothing above them is imported here, so any
layer can raise any of them. The launchers map them to exit statuses:
`ConfigError` 2 (bad flags, data layout, checkpoints of another run: nothing
was written), `ClusterError`, `DataError` and `NonFiniteError` 1 (a failure
while running), `Preempted` 143 (SIGTERM, after a checkpoint was saved).
"""

from __future__ import annotations

from typing import Optional, Sequence


class ConfigError(ValueError):
  """A configuration problem found before training; the launcher exits 2."""


class ClusterError(RuntimeError):
  """Another worker failed or a collective timed out; the launcher exits 1."""


class NonFiniteError(RuntimeError):
  """A loss or gradient was NaN or Inf (--on_nonfinite=stop); exit 1."""


class DataError(RuntimeError):
  """Bad data found while training (an in-graph check failed); exit 1."""


class Preempted(Exception):
  """The run saved a checkpoint on SIGTERM and stopped early.

  Attributes:
    step: The step it stopped and saved at.
    checkpoint: The saved checkpoint's path.
  """

  def __init__(self, step: int, checkpoint: Optional[str]):
    super().__init__(f"stopped by SIGTERM at step {step}; saved checkpoint "
                     f"{checkpoint}; run the same command to resume from it")
    self.step = step
    self.checkpoint = checkpoint


def check_choice(flag: str, value: str, choices: Sequence[str]) -> None:
  """Raises ConfigError naming `--flag=value` unless it is one of `choices`."""
  if value not in choices:
    raise ConfigError(f"--{flag}={value}: must be one of {', '.join(choices)}")
