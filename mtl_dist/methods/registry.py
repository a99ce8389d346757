"""Name registries of loss weightings and gradient aggregators.

A method class registers itself with `AGGREGATORS.register` or
`WEIGHTINGS.register` where it is defined, and declares its hyperparameters
as `Option`s. Each option is the flag `--<method>_<option>` (e.g.
`--cagrad_c`), valid only with its method; its default lives in the option
alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import numpy as np
import tensorflow as tf

from mtl_dist import errors

_C = TypeVar("_C", bound=type)
# No method option is meaningful beyond this magnitude; 1e300 or inf would
# only turn the run's numbers into NaN later, blamed on the data.
MAX_OPTION = 1e6


@dataclasses.dataclass(frozen=True)
class Option:
  """A hyperparameter of a method.

  Attributes:
    name: The option's name; its flag is `--<method>_<name>`.
    default: The paper's value; its type (int or float) is the option's.
    help: What it sets, for `--helpfull`.
    minimum: The least allowed value (None: any).
    strict: The value must exceed `minimum` (a "positive" option).
    maximum: The largest allowed value (None: any).
  """

  name: str
  default: Any
  help: str
  minimum: Optional[float] = None
  strict: bool = False
  maximum: Optional[float] = None

  def check(self, flag: str, value: Any) -> None:
    """Raises ConfigError naming `--flag=value` if the value is not allowed."""
    kind = type(self.default)
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
      raise errors.ConfigError(f"--{flag}={value}: must be an integer")
    if not abs(value) <= MAX_OPTION:  # Also NaN; no float() of a huge int.
      raise errors.ConfigError(f"--{flag}={value}: must be a finite number "
                               f"of magnitude at most {MAX_OPTION:g}")
    if self.maximum is not None and not value <= self.maximum:
      raise errors.ConfigError(f"--{flag}={value}: must be <= {self.maximum:g}")
    if self.minimum is None:
      return
    if self.strict and not value > self.minimum:
      raise errors.ConfigError(
          f"--{flag}={value}: must be "
          + ("positive" if self.minimum == 0 else f"> {self.minimum}"))
    if not self.strict and not value >= self.minimum:
      raise errors.ConfigError(f"--{flag}={value}: must be >= {self.minimum:g}")


class Registry:
  """Method classes of one kind (`aggregator` or `weighting`) by name."""

  def __init__(self, kind: str, first: Sequence[str]):
    """Creates an empty registry.

    Args:
      kind: The flag that picks a method, without dashes.
      first: The names listed first, in this order (the flag's default,
        then the methods it has offered longest); the rest follow
        alphabetically.
    """
    self.kind = kind
    self.default = first[0]
    self._first = tuple(first)
    self._classes: dict[str, type] = {}

  def register(self, cls: _C) -> _C:
    """Class decorator: registers `cls` under `cls.name`."""
    if cls.name in self._classes:
      raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
    self._classes[cls.name] = cls
    return cls

  def names(self) -> tuple[str, ...]:
    """The registered names: `first`, then the others alphabetically."""
    first = [name for name in self._first if name in self._classes]
    return (*first, *sorted(set(self._classes) - set(first)))

  def get(self, name: str) -> type:
    """The class registered as `name`.

    Raises:
      ValueError: For an unknown name, listing the known ones.
    """
    if name not in self._classes:
      raise errors.ConfigError(f"unknown {self.kind} {name!r} (known: "
                       f"{', '.join(self.names())})")
    return self._classes[name]

  def describe(self) -> str:
    """'name (summary), ...' of every method, for a flag's help."""
    return ", ".join(f"{name} ({self._classes[name].summary})"
                     for name in self.names())

  def create(self, name: str, *args: Any, **options: Any) -> Any:
    """A new instance of method `name`: `cls(*args, **options)`.

    Raises:
      ValueError: For an unknown name, or an option the method does not
        have (naming the ones it has); ConfigError (a ValueError) for a
        value out of the option's bounds.
    """
    cls = self.get(name)
    known = {option.name: option for option in cls.options}
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise errors.ConfigError(f"{self.kind} {name!r} has no option "
                       f"{', '.join(unknown)} (its options: "
                       f"{', '.join(sorted(known)) or 'none'})")
    for key, value in options.items():  # As the flags are checked.
      known[key].check(f"{name}_{key}", value)
    return cls(*args, **options)

  def options(self) -> Iterator[tuple[str, str, Option]]:
    """(flag, method, option) for every option of every method, by flag."""
    found = [(f"{name}_{option.name}", name, option)
             for name, cls in self._classes.items() for option in cls.options]
    return iter(sorted(found))

  def resolve_options(self, name: str,
                      given: Callable[[str], Any]) -> dict[str, Any]:
    """Method `name`'s options: given values checked, the rest defaulted.

    Args:
      name: The chosen method.
      given: Maps a flag name to its value, None when not given.

    Returns:
      Option name to value, ready for the method's constructor.

    Raises:
      ConfigError: For a given value that is not allowed.
    """
    values = {}
    for option in self.get(name).options:
      flag = f"{name}_{option.name}"
      value = given(flag)
      if value is None:
        value = option.default
      else:
        option.check(flag, value)
      values[option.name] = value
    return values


AGGREGATORS = Registry("aggregator", ("sum", "pcgrad", "cagrad", "mgda"))
WEIGHTINGS = Registry("weighting", ("static", "uncertainty", "dwa",
                                    "gradnorm"))


def gram_forms() -> list[str]:
  """The aggregators with a Gram-matrix form (usable with --rep_grad)."""
  return [name for name in AGGREGATORS.names()
          if AGGREGATORS.get(name).has_gram_form]


def state_of(method: tf.Module) -> dict[str, np.ndarray]:
  """A method's state: each of its variables' value by the variable's name."""
  return {v.name.split(":")[0]: v.numpy() for v in method.variables}


def assign_state(method: tf.Module, state: Mapping[str, Any],
                 what: str) -> None:
  """Sets a method's variables from `state` (as `state_of` returned it).

  Args:
    method: The method's module.
    state: Variable name to value.
    what: The method, as messages name it (e.g. "aggregator 'gradvac'").

  Raises:
    ValueError: For a name that is not one of the method's variables.
  """
  variables = {v.name.split(":")[0]: v for v in method.variables}
  for key, value in state.items():
    if key not in variables:
      raise errors.ConfigError(f"{what} has no state {key!r} (its state: "
                       f"{', '.join(sorted(variables)) or 'none'})")
    variables[key].assign(value)
