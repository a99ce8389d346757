"""The data layer: sources, pipelines, pre-flight checks, named datasets.

- `sources`: `ExampleSource`, `MultiTaskData` and the constructors from
  arrays and `tf.data` datasets;
- `pipelines`: one distributed pipeline per source (`distribute_train`,
  `distribute_eval`);
- `checks`: the pre-flight checks of a run's data;
- `registry`: `load`, the named datasets and the one reader of the data
  settings; `shapes`, `toy_regression` and `tfds` are the datasets.

The names below are this layer's API for the layers above.
"""

from mtl_dist.data.checks import check
from mtl_dist.data.checks import check_layout
from mtl_dist.data.pipelines import distribute_eval
from mtl_dist.data.pipelines import distribute_train
from mtl_dist.data.pipelines import input_options
from mtl_dist.data.registry import load
from mtl_dist.data.sources import ExampleSource
from mtl_dist.data.sources import input_dtype
from mtl_dist.data.sources import MultiTaskData
from mtl_dist.data.sources import source_from_arrays
from mtl_dist.data.sources import source_from_dataset

__all__ = [
    "ExampleSource", "MultiTaskData", "check", "check_layout",
    "distribute_eval", "distribute_train", "input_dtype", "input_options",
    "load", "source_from_arrays", "source_from_dataset",
]
