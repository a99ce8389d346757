"""The architecture section of a run's configuration.

`--architecture` picks the model; each architecture reads only its own
options, and an option given for another architecture is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from mtl_dist import errors

# --mixed_precision: what the trunk computes in (`precision` applies it).
MIXED_PRECISION = ("none", "bfloat16", "float16")
ARCHITECTURES = ("hps", "mmoe", "cgc", "ple", "cross_stitch", "dselect_k",
                 "mtan")
# Architectures with one representation every task reads (--rep_grad).
WITH_REPRESENTATION = ("hps", "mmoe", "cgc", "dselect_k")
# The most experts, levels or trunk layers a model is built with: each is a
# Python object built one at a time, so 10**12 would never finish building.
MAX_UNITS = 1024

# Option -> the architectures it applies to.
OPTIONS = {
    "num_experts": ("mmoe", "dselect_k"),
    "num_shared_experts": ("cgc", "ple"),
    "num_task_experts": ("cgc", "ple"),
    "num_levels": ("ple",),
    "num_selected_experts": ("dselect_k",),
    "dselect_k_gamma": ("dselect_k",),
    "dselect_k_entropy_reg": ("dselect_k",),
}


@dataclasses.dataclass(frozen=True)
class ArchitectureConfig:
  """Which architecture a run trains, with its options.

  Attributes:
    architecture: One of `ARCHITECTURES`.
    num_experts: mmoe, dselect_k: shared experts.
    num_shared_experts: cgc, ple: shared experts per level.
    num_task_experts: cgc, ple: each task's private experts per level.
    num_levels: ple: extraction levels.
    num_selected_experts: dselect_k: experts each gate selects (k).
    dselect_k_gamma: dselect_k: the smooth step's width (official default).
    dselect_k_entropy_reg: dselect_k: the selectors' entropy
      regularization, per example (the official regularizer's default).
  """

  architecture: str = "hps"
  num_experts: int = 4
  num_shared_experts: int = 2
  num_task_experts: int = 1
  num_levels: int = 2
  num_selected_experts: int = 2
  dselect_k_gamma: float = 1.0
  dselect_k_entropy_reg: float = 1e-6

  def __post_init__(self):
    """Checks the settings (the launcher's checks, for the Python API).

    Raises:
      ValueError: Naming the first bad setting.
    """
    try:
      _check_values(self)
    except errors.ConfigError as e:
      raise errors.ConfigError(str(e)) from None

  @property
  def has_representation(self) -> bool:
    """Whether one representation feeds every task (for --rep_grad)."""
    return self.architecture in WITH_REPRESENTATION or (
        self.architecture == "ple" and self.num_levels == 1)

  def to_json(self) -> dict[str, Any]:
    """The architecture and the options it reads."""
    return {"architecture": self.architecture,
            **{name: getattr(self, name) for name, used in OPTIONS.items()
               if self.architecture in used}}

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> "ArchitectureConfig":
    return cls(**value)


def validate_flags(given: Mapping[str, Any]) -> None:
  """Checks --architecture and its options; None means unset.

  Raises:
    ConfigError: For an unknown architecture, an option of another
      architecture, or an option out of range.
  """
  architecture = given.get("architecture") or "hps"
  errors.check_choice("architecture", architecture, ARCHITECTURES)
  for name, used in OPTIONS.items():
    if given.get(name) is not None and architecture not in used:
      raise errors.ConfigError(
          f"--{name} applies to --architecture={' or '.join(used)} only, but "
          f"--architecture={architecture} is set")
  config = _unchecked({name: given[name] for name in ("architecture", *OPTIONS)
                      if given.get(name) is not None})
  _check_values(config)
  if given.get("rep_grad") and not config.has_representation:
    raise errors.ConfigError(
        f"--rep_grad needs one representation every task reads; "
        f"--architecture={architecture} has none (it has with "
        f"--architecture={', '.join(WITH_REPRESENTATION)}, and ple with "
        "--num_levels=1)")


def _check_values(config: ArchitectureConfig) -> None:
  """Checks the architecture's name and every option's range.

  Raises:
    ConfigError: Naming the first bad setting.
  """
  errors.check_choice("architecture", config.architecture, ARCHITECTURES)
  for name in OPTIONS:
    value = getattr(config, name)
    if name.startswith("num_"):
      lowest = 0 if name == "num_task_experts" else 1
      if not isinstance(value, int) or isinstance(value, bool) or not (
          lowest <= value <= MAX_UNITS):
        raise errors.ConfigError(
            f"--{name}={value}: must be an integer from {lowest} to "
            f"{MAX_UNITS}")
    elif not math.isfinite(value):
      raise errors.ConfigError(f"--{name}={value}: must be a finite number")
    elif name == "dselect_k_gamma" and not value > 0:
      raise errors.ConfigError(f"--{name}={value}: must be positive")
    elif name == "dselect_k_entropy_reg" and not value >= 0:
      raise errors.ConfigError(f"--{name}={value}: must be >= 0")
  if config.architecture == "dselect_k":
    if config.num_experts < 2:
      raise errors.ConfigError(
          f"--num_experts={config.num_experts}: dselect_k selects among at "
          "least 2 experts")
    if config.num_selected_experts > config.num_experts:
      raise errors.ConfigError(
          f"--num_selected_experts={config.num_selected_experts}: more than "
          f"the --num_experts={config.num_experts}")


def _unchecked(values: Mapping[str, Any]) -> ArchitectureConfig:
  """An ArchitectureConfig of `values` without `__post_init__`'s check."""
  config = object.__new__(ArchitectureConfig)
  for field in dataclasses.fields(ArchitectureConfig):
    object.__setattr__(config, field.name,
                       values.get(field.name, field.default))
  return config
