"""The named datasets: `shapes`, `toy_regression` and `tfds:NAME`.

`load` is the one reader of a run's data settings; it returns the run's
`MultiTaskData` for the configured mode.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.data import settings
from mtl_dist.data import shapes
from mtl_dist.data import sources
from mtl_dist.data import toy_regression


def load(config: settings.DataConfig) -> sources.MultiTaskData:
  """Loads the dataset named by `config.dataset` for the configured mode.

  Args:
    config: The run's data section (`TrainConfig.data_config()`).

  Returns:
    The run's data.

  Raises:
    ConfigError: For an unknown dataset or task.
    TypeError: For a `config` that is not a `DataConfig`.
  """
  if not isinstance(config, settings.DataConfig):
    raise TypeError(f"load() takes the data section (a DataConfig, e.g. "
                    f"TrainConfig.data_config()), not {type(config).__name__}")
  if config.uses_tfds:
    from mtl_dist.data import tfds  # pylint: disable=g-import-not-at-top
    if config.mode == "joint":
      return tfds.load_joint(config)
    return tfds.load_alternate(config)
  if config.dataset == "toy_regression":
    return _load_toy_regression(config)
  if config.dataset != "shapes":
    raise errors.ConfigError(
        f"--dataset={config.dataset}: unknown dataset (known: shapes, "
        "toy_regression, tfds:NAME)")
  names, tasks = _chosen_tasks(config, shapes.TASKS)
  if config.mode == "joint":
    sizes = [config.train_examples]
  else:
    sizes_by_task = dict(shapes.default_task_sizes(names))
    sizes_by_task.update(config.task_sizes or {})
    sizes = [sizes_by_task[name] for name in names]
  # One pool cut into disjoint pieces: training sets first, then eval.
  features, labels = shapes.generate(sum(sizes) + config.eval_examples,
                                     config.seed)
  if config.label_fraction:
    labels = shapes.drop_labels(labels, config.label_fraction,
                                num_examples=sizes[0], seed=config.seed)
  bounds = np.cumsum([0] + sizes)
  eval_part = slice(bounds[-1], None)

  def cut(part: slice, task_names: Sequence[str]) -> sources.ExampleSource:
    return sources.source_from_arrays(features[part],
                              {k: v[part] for k, v in labels.items()},
                              task_names)

  if config.mode == "joint":
    train = (cut(slice(0, bounds[1]), names),)
    evaluation = (cut(eval_part, names),)
  else:
    train = tuple(cut(slice(bounds[i], bounds[i + 1]), [name])
                  for i, name in enumerate(names))
    evaluation = tuple(cut(eval_part, [name]) for name in names)
  return sources.MultiTaskData(tasks=tasks, input_shape=features.shape[1:],
                       train=train, eval=evaluation,
                       partial_labels=bool(config.label_fraction))


def _chosen_tasks(
    config: settings.DataConfig, known: Sequence[tasks_lib.TaskSpec]
) -> tuple[list[str], tuple[tasks_lib.TaskSpec, ...]]:
  """The configured tasks among a dataset's, with their --task_weights."""
  names = config.validate_tasks([task.name for task in known])
  specs = {task.name: task for task in known}
  return names, tuple(specs[name].with_weight(config.weight_of(name))
                      for name in names)


def _load_toy_regression(config: settings.DataConfig) -> sources.MultiTaskData:
  """The GradNorm paper's synthetic regression tasks (joint mode)."""
  names, tasks = _chosen_tasks(config, toy_regression.TASKS)
  num_train = config.train_examples
  features, labels = toy_regression.generate(
      num_train + config.eval_examples, config.seed)
  train = sources.source_from_arrays(features[:num_train],
                             {k: v[:num_train] for k, v in labels.items()},
                             names)
  evaluation = sources.source_from_arrays(features[num_train:],
                                  {k: v[num_train:] for k, v in labels.items()},
                                  names)
  return sources.MultiTaskData(tasks=tasks, input_shape=features.shape[1:],
                       train=(train,), eval=(evaluation,))
