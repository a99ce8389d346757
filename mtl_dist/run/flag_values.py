"""Flag values that are more than a scalar: `name=value,...` maps."""

from __future__ import annotations

from typing import Callable, TypeVar

from mtl_dist import errors

_V = TypeVar("_V")


def parse_key_values(text: str, flag: str,
                     parse_value: Callable[[str], _V]) -> dict[str, _V]:
  """Parses `a=1.0,b=0.5` into `{"a": 1.0, "b": 0.5}`.

  Args:
    text: The flag's value.
    flag: The flag's name, for error messages.
    parse_value: Converts one value; raises ValueError on bad input.

  Returns:
    The mapping, in the order given.

  Raises:
    ConfigError: On a malformed item, an empty key or a repeated key.
  """
  result: dict[str, _V] = {}
  for item in text.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise errors.ConfigError(
          f"--{flag}={text}: expected name=value items separated "
          f"by commas, got {item!r}")
    if key in result:
      raise errors.ConfigError(f"--{flag}={text}: {key!r} is given twice")
    try:
      result[key] = parse_value(value.strip())
    except ValueError:
      raise errors.ConfigError(
          f"--{flag}={text}: bad value {value.strip()!r} for "
          f"{key!r}") from None
  return result
