"""The data layer: sources, pipelines, pre-flight checks, named datasets.

- `sources`: `ExampleSource`, `MultiTaskData` and the constructors from
  arrays and `tf.data` datasets;
- `pipelines`: one distributed pipeline per source (`distribute_train`,
  `distribute_eval`);
- `checks`: the pre-flight checks of a run's data;
- `registry`: `load`, the named datasets and the one reader of the data
  settings; `shapes`, `toy_regression` and `tfds` are the datasets.

The names below are this layer's API for the layers above; `settings`,
the data section of the configuration, imports no TensorFlow.
"""

import importlib
from typing import Any

# Each name below, and the module that defines it. They are imported on
# first use (PEP 562), so that `mtl_dist.data.settings` (the data section of
# the configuration) is read without TensorFlow.
_MODULES = {
    "ExampleSource": "sources",
    "MultiTaskData": "sources",
    "check": "checks",
    "check_layout": "checks",
    "distribute_eval": "pipelines",
    "distribute_train": "pipelines",
    "input_dtype": "sources",
    "input_options": "pipelines",
    "load": "registry",
    "source_from_arrays": "sources",
    "source_from_dataset": "sources",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
  if name not in _MODULES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"),
                  name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_MODULES})
