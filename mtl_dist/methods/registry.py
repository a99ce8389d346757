"""The method classes behind the catalogue's names, and their state.

`catalog` lists every loss weighting and gradient aggregator with its
options, without TensorFlow. Here each name meets its `tf.Module` class: a
method's module registers its class (`@AGGREGATORS.register` or
`@WEIGHTINGS.register`), which gives the class its catalogue entry's
`summary` and `options` and refuses a class that disagrees with the entry.
`get` and `create` find a class by name, importing the method packages
(`aggregators/`, `weightings/`, one module per method) the first time.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist.methods import catalog

_C = TypeVar("_C", bound=type)
# Where the catalogue's types live, for the code that used them from here.
MAX_OPTION = catalog.MAX_OPTION
Option = catalog.Option
# What a class declares itself that its catalogue entry declares too: the
# step reads the class, the configuration checks read the entry.
_DECLARED = ("has_gram_form", "sub_batches", "needs_losses")


class Registry:
  """Method classes of one kind (`aggregator` or `weighting`) by name."""

  def __init__(self, catalogue: catalog.Catalogue):
    """Creates an empty registry for the methods `catalogue` lists.

    Args:
      catalogue: The methods' entries (`catalog.AGGREGATORS`, ...).
    """
    self.catalogue = catalogue
    self.kind = catalogue.kind
    self.default = catalogue.default
    self._classes: dict[str, type] = {}

  def register(self, cls: _C,
               entry: Optional[catalog.Method] = None) -> _C:
    """Class decorator: registers `cls` under `cls.name`.

    Sets the class's `summary` and `options` from its catalogue entry.

    Args:
      cls: The method's class.
      entry: For a method defined outside this package (a test's, a
        user's): its entry, added to the catalogue. None: the catalogue's.

    Raises:
      ValueError: For a name registered twice, a class the catalogue does
        not list, one that declares its own `summary` or `options`, or one
        whose `has_gram_form`, `sub_batches` or `needs_losses` differ from
        its entry's.
    """
    name = cls.name
    if name in self._classes:
      raise ValueError(f"{self.kind} {name!r} is registered twice")
    if entry is not None:
      if entry.name != name:
        raise ValueError(f"{self.kind} {name!r} given the entry of "
                         f"{entry.name!r}")
      self.catalogue.add(entry)
    if name not in self.catalogue.names():
      raise ValueError(f"{self.kind} {name!r} has no entry in "
                       "mtl_dist/methods/catalog.py")
    entry = self.catalogue.get(name)
    for field in ("summary", "options"):
      if field in vars(cls):
        raise ValueError(f"{self.kind} {name!r} declares its {field}; it "
                         "comes from its catalogue entry")
    for field in _DECLARED:
      declared = getattr(cls, field, getattr(catalog.Method, field))
      if declared != getattr(entry, field):
        raise ValueError(f"{self.kind} {name!r}: the class declares {field}="
                         f"{declared!r}, its catalogue entry "
                         f"{getattr(entry, field)!r}")
    cls.summary = entry.summary
    cls.options = entry.options
    self._classes[name] = cls
    return cls

  def names(self) -> tuple[str, ...]:
    """The catalogued names: `first`, then the others alphabetically."""
    return self.catalogue.names()

  def get(self, name: str) -> type:
    """The class registered as `name`.

    Raises:
      ConfigError: For an unknown name, listing the known ones.
    """
    self.catalogue.get(name)
    if name not in self._classes:  # Registers every method of this kind.
      importlib.import_module(f"mtl_dist.methods.{self.kind}s")
    if name not in self._classes:
      raise LookupError(f"{self.kind} {name!r} is catalogued, but no class "
                        "registered it")
    return self._classes[name]

  def registered(self) -> dict[str, type]:
    """Every registered class by name (after importing every method)."""
    importlib.import_module(f"mtl_dist.methods.{self.kind}s")
    return dict(self._classes)

  def describe(self) -> str:
    """'name (summary), ...' of every method, for a flag's help."""
    return self.catalogue.describe()

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
    return self.catalogue.options()

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
    for option in self.catalogue.get(name).options:
      flag = f"{name}_{option.name}"
      value = given(flag)
      if value is None:
        value = option.default
      else:
        option.check(flag, value)
      values[option.name] = value
    return values


AGGREGATORS = Registry(catalog.AGGREGATORS)
WEIGHTINGS = Registry(catalog.WEIGHTINGS)


def gram_forms() -> list[str]:
  """The aggregators with a Gram-matrix form (usable with --rep_grad)."""
  return [name for name in AGGREGATORS.names()
          if AGGREGATORS.catalogue.get(name).has_gram_form]


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
