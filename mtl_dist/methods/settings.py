"""The methods' section of a run's configuration: alternate mode's schedule.

Its defaults are the run's: a `TrainConfig` field left unset (None) takes
the value here. No TensorFlow: `schedules` makes the schedule it names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from mtl_dist import errors

NAMES = ("round_robin", "proportional", "temperature", "annealed", "weights")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The schedule section of a run's configuration (alternate mode).

  Its defaults are the run's: a `TrainConfig` field left unset (None)
  takes the value here.

  Attributes:
    schedule: One of `NAMES`.
    temperature: The temperature schedule's T.
    mixing_cap: The temperature schedule's cap K on dataset sizes (0: none).
    steps_per_epoch: The annealed schedule's epoch length (None: one pass
      over every task's data).
    anneal_epochs: The annealed schedule's E (None: the epochs in the
      run's steps).
  """

  schedule: str = "round_robin"
  temperature: float = 2.0
  mixing_cap: int = 0
  steps_per_epoch: Optional[int] = None
  anneal_epochs: Optional[int] = None


def validate_flags(given: Mapping[str, Any]) -> None:
  """Refuses schedule flags that do not fit the chosen schedule (alternate).

  Args:
    given: TrainConfig's fields by name, None where unset.

  Raises:
    ConfigError: Naming the first flag that does not apply or fit.
  """
  schedule = given["schedule"] or ScheduleConfig.schedule
  if given["task_weights"] is not None and schedule != "weights":
    raise errors.ConfigError(
        "--task_weights applies to --mode=joint (loss weights) or "
        f"--schedule=weights (task shares), but --schedule={schedule} is "
        "set in alternate mode")
  for name, needs in (("temperature", "temperature"),
                      ("mixing_cap", "temperature"),
                      ("steps_per_epoch", "annealed"),
                      ("anneal_epochs", "annealed")):
    if given[name] is not None and schedule != needs:
      raise errors.ConfigError(
          f"--{name} applies to --schedule={needs} only, but "
          f"--schedule={schedule} is set")
  if given["temperature"] is not None and not given["temperature"] > 0:
    raise errors.ConfigError(
        f"--temperature={given['temperature']}: must be positive")
  if given["mixing_cap"] is not None and given["mixing_cap"] < 0:
    raise errors.ConfigError(
        f"--mixing_cap={given['mixing_cap']}: must be >= 0 (0 "
        "means no cap)")
  for name in ("steps_per_epoch", "anneal_epochs"):
    value = given[name]
    if value is not None and value < 1:
      raise errors.ConfigError(f"--{name}={value}: must be positive")
