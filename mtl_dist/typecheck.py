"""Checks values against type annotations, for one-line argument errors.

The Python API takes dataclasses (`TrainConfig`, `TaskSpec`, ...) and
functions whose arguments users type by hand; a wrong type must end in a
`ConfigError` naming the argument, not a TypeError from deep inside. These
helpers check a value against the annotations those classes already carry:
builtin scalars, `Optional`/`Union`, `Sequence[...]`, `Tuple[X, ...]`,
`Mapping[K, V]`, `Callable` and classes.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import numbers
import os
import typing
from typing import Any, Callable

import numpy as np

from mtl_dist import errors

_NAMES = {int: "an integer", float: "a number", str: "a string",
          bool: "True or False"}


def matches(value: Any, annotation: Any) -> bool:
  """Whether `value` is of type `annotation` (see the module doc)."""
  if annotation is Any:
    return True
  origin = typing.get_origin(annotation)
  arguments = typing.get_args(annotation)
  if origin is typing.Union:
    return any(matches(value, argument) for argument in arguments)
  if annotation is type(None):
    return value is None
  if annotation is bool:
    return isinstance(value, (bool, np.bool_))
  if annotation is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  if origin is collections.abc.Callable or annotation is typing.Callable:
    return callable(value)
  if origin in (collections.abc.Sequence, list, tuple):
    if isinstance(value, (str, bytes)) or not isinstance(
        value, (list, tuple)):
      return False
    if origin is tuple and arguments and arguments[-1] is not Ellipsis:
      return len(value) == len(arguments) and all(
          matches(v, a) for v, a in zip(value, arguments))
    item = arguments[0] if arguments else Any
    return all(matches(v, item) for v in value)
  if origin in (collections.abc.Mapping, dict):
    if not isinstance(value, collections.abc.Mapping):
      return False
    key, item = arguments if arguments else (Any, Any)
    return all(matches(k, key) and matches(v, item)
               for k, v in value.items())
  if isinstance(annotation, type):
    if getattr(annotation, "_is_protocol", False):
      return True  # A typing.Protocol: what it asks for is duck-typed.
    return isinstance(value, annotation)
  return True  # Annotations this module does not know are not checked.


def describe(annotation: Any) -> str:
  """`annotation` in words: "an integer", "a list of strings", ..."""
  origin = typing.get_origin(annotation)
  arguments = typing.get_args(annotation)
  if annotation is Any:
    return "a value"
  if origin is typing.Union:
    kinds = [describe(a) for a in arguments if a is not type(None)]
    text = " or ".join(kinds)
    return f"{text} or None" if type(None) in arguments else text
  if annotation in _NAMES:
    return _NAMES[annotation]
  if origin is collections.abc.Callable or annotation is typing.Callable:
    return "a function"
  if origin in (collections.abc.Sequence, list, tuple):
    item = arguments[0] if arguments else Any
    return f"a list of {_plural(item)}"
  if origin in (collections.abc.Mapping, dict):
    key, item = arguments if arguments else (Any, Any)
    return f"a dict of {_plural(key)} to {_plural(item)}"
  if isinstance(annotation, type):
    return article(_CLASS_NAMES.get(annotation.__name__, annotation.__name__))
  return str(annotation)


# Classes whose names are not what users write.
_CLASS_NAMES = {"DatasetV2": "tf.data.Dataset", "ndarray": "NumPy array"}


def article(noun: str) -> str:
  """`noun` after "a" or "an"."""
  return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def kind_of(value: Any) -> str:
  """The type of `value` as users name it, with its article."""
  name = type(value).__name__
  return article(_CLASS_NAMES.get(name, name))


def _plural(annotation: Any) -> str:
  text = describe(annotation)
  text = text.split(" ", 1)[1] if text.startswith(("a ", "an ")) else text
  return {"number": "numbers", "integer": "integers", "string": "strings",
          "value": "values"}.get(text, f"{text} objects")


def _found(value: Any, annotation: Any) -> str:
  """What `value` is, down to the first item that does not match."""
  origin = typing.get_origin(annotation)
  if origin is typing.Union:
    shapes = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(shapes) == 1:
      return _found(value, shapes[0])
  arguments = typing.get_args(annotation)
  if origin in (collections.abc.Sequence, list, tuple) and isinstance(
      value, (list, tuple)) and arguments:
    for item in value:
      if not matches(item, arguments[0]):
        return (f"{kind_of(value)} holding "
                f"{_found(item, arguments[0])}")
  if origin in (collections.abc.Mapping, dict) and isinstance(
      value, collections.abc.Mapping) and arguments:
    for key, item in value.items():
      if not matches(key, arguments[0]):
        return f"a dict with the key {key!r}"
      if not matches(item, arguments[1]):
        return f"a dict whose {key!r} is {_found(item, arguments[1])}"
  return kind_of(value)


def check(value: Any, annotation: Any, name: str) -> None:
  """Raises ConfigError "`name`=value: must be ..." unless `value` matches.

  Args:
    value: What was given.
    annotation: Its expected type.
    name: How users know the argument, e.g. "--train_steps" or
      "TaskSpec.name".
  """
  if not matches(value, annotation):
    shown = " ".join(repr(value).split())
    if len(shown) > 60:
      shown = shown[:57] + "..."
    raise errors.ConfigError(
        f"{name}={shown}: must be {describe(annotation)}, got "
        f"{_found(value, annotation)}")


def normalized(value: Any, annotation: Any) -> Any:
  """`value` in the plain Python form `annotation` names, where one exists.

  A NumPy scalar becomes its Python number, a path object its string, and a
  shape-like iterable (TensorShape, array) a tuple, when the result matches
  `annotation` and `value` does not: what is kept must also go into JSON.
  """
  if matches(value, annotation) and not isinstance(value, np.generic):
    return value
  candidate = value
  if isinstance(value, np.generic):
    candidate = value.item()
  elif isinstance(value, os.PathLike):
    candidate = os.fspath(value)
  elif not isinstance(value, (str, bytes, list, tuple, dict)) and hasattr(
      value, "__iter__"):
    try:
      candidate = tuple(v.item() if isinstance(v, np.generic) else v
                        for v in value)
    except TypeError:
      return value
  return candidate if matches(candidate, annotation) else value


def check_fields(instance: Any, name_format: str = "{owner}.{field}") -> None:
  """Checks every field of a dataclass instance against its annotation.

  Fields of a `normalized` form are replaced by it (also on frozen
  instances), so NumPy scalars and path objects are taken.

  Args:
    instance: The dataclass instance.
    name_format: Names a field in messages; `{owner}` is the class name and
      `{field}` the field's ("--{field}" for flags).

  Raises:
    ConfigError: Naming the first field of the wrong type.
  """
  hints = typing.get_type_hints(type(instance))
  for field in dataclasses.fields(instance):
    value = getattr(instance, field.name)
    plain = normalized(value, hints[field.name])
    if plain is not value:
      object.__setattr__(instance, field.name, plain)
    check(plain, hints[field.name],
          name_format.format(owner=type(instance).__name__, field=field.name))


def checked(function: Callable) -> Callable:
  """Decorates a public function to check its arguments' types first.

  Each argument with an annotation is checked against it (see `matches`),
  after taking its `normalized` form, which is what the function gets; a
  wrong one raises `ConfigError` "function: name=value: must be ...".
  """
  signature = inspect.signature(function)
  hints: dict[str, Any] = {}
  # "train", or "Trainer" for a class's __init__.
  name = function.__qualname__.removesuffix(".__init__")

  @functools.wraps(function)
  def wrapped(*args, **kwargs):
    if not hints:  # Resolved at the first call: forward references.
      hints.update(typing.get_type_hints(function))
      hints.pop("return", None)
    try:
      bound = signature.bind(*args, **kwargs)
    except TypeError as e:
      raise errors.ConfigError(f"{name}: {e}") from None
    for argument, value in bound.arguments.items():
      if argument in hints:
        plain = normalized(value, hints[argument])
        check(plain, hints[argument], f"{name}: {argument}")
        bound.arguments[argument] = plain
    return function(*bound.args, **bound.kwargs)

  return wrapped
