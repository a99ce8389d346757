"""Pre-flight checks of a run's data: layout, sizes, shapes, labels, values.

Everything here runs before training, so bad data ends the run with one
`ConfigError` line (exit status 2) before anything is written.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.data import sources


def check_layout(data: sources.MultiTaskData, mode: str) -> None:
  """Checks that the sources are laid out as `mode` reads them.

  Joint mode reads one training source labelled for every task; alternate
  mode one source per task, in task order. Every task needs eval data.

  Raises:
    ConfigError: Naming what does not fit.
  """
  names = [task.name for task in data.tasks]
  if mode == "joint":
    if len(data.train) != 1 or set(data.train[0].task_names) != set(names):
      raise errors.ConfigError(
          f"joint mode trains from one source labelled for every task "
          f"({', '.join(names)}), got {len(data.train)} source(s) labelled "
          f"for {[list(s.task_names) for s in data.train]}")
  elif [tuple(s.task_names) for s in data.train] != [(n,) for n in names]:
    raise errors.ConfigError(
        f"alternate mode trains from one source per task, in task order "
        f"({', '.join(names)}), got sources labelled for "
        f"{[list(s.task_names) for s in data.train]}")
  evaluated = [name for source in data.eval for name in source.task_names]
  unknown = sorted(set(evaluated) - set(names))
  missing = [name for name in names if name not in evaluated]
  if unknown or missing:
    raise errors.ConfigError(
        "the eval sources must cover each task: "
        + (f"no eval data for {missing}" if missing else
           f"unknown task(s) {unknown}"))


_FIRST_BATCH = 256  # Examples of a streamed source checked before training.


def check(data: sources.MultiTaskData, partial_labels: bool) -> None:
  """Checks every source before training: sizes, shapes, labels, values.

  In-memory sources are checked whole; streamed ones on their first
  examples (the in-graph label checks of `TaskSpec.per_example_loss` watch
  the rest while training).

  Args:
    data: The run's data.
    partial_labels: Whether examples may lack labels (-1 class, NaN target).

  Raises:
    ConfigError: Naming the task, the split and what is wrong.
  """
  specs = {task.name: task for task in data.tasks}
  first_dtype = None  # Every source must feed the model the same dtype.
  for split, split_sources in (("training", data.train),
                               ("eval", data.eval)):
    for source in split_sources:
      names = ", ".join(source.task_names)
      where = f"{split} data of task(s) {names}"
      if source.num_examples <= 0:
        raise errors.ConfigError(f"{where}: no examples (an empty "
                                 "dataset or split)")
      if source.arrays is not None:
        features, labels = source.arrays
      else:
        features, labels = _first_examples(source, where)
      if tuple(features.shape[1:]) != tuple(data.input_shape):
        raise errors.ConfigError(
            f"{where}: inputs have shape {tuple(features.shape[1:])}, the "
            f"model's input is {tuple(data.input_shape)}")
      if first_dtype is None:
        first_dtype = (features.dtype, where)
      elif features.dtype != first_dtype[0]:
        raise errors.ConfigError(
            f"{where}: inputs are {features.dtype}, those of the "
            f"{first_dtype[1]} are {first_dtype[0]}")
      if (np.issubdtype(features.dtype, np.floating) and
          not np.all(np.isfinite(features))):
        bad = int(np.sum(~np.isfinite(features).reshape(len(features), -1)
                         .all(axis=1)))
        raise errors.ConfigError(f"{where}: {bad} example(s) have NaN or "
                                 "Inf inputs")
      for name in source.task_names:
        _check_labels(specs[name], labels, where, partial_labels,
                      whole=source.arrays is not None)


def _first_examples(source: sources.ExampleSource, where: str):
  """The first examples of a streamed source, as NumPy arrays."""
  try:
    batch = next(iter(source.make_dataset().batch(_FIRST_BATCH).take(1)))
  except StopIteration:
    raise errors.ConfigError(f"{where}: no examples (an empty dataset or "
                             "split)") from None
  except tf.errors.OpError as e:
    raise errors.ConfigError(
        f"{where}: cannot read a first batch ({type(e).__name__}: "
        f"{str(e.message).strip().splitlines()[0][:200]})") from None
  features, labels = batch
  return features.numpy(), {k: v.numpy() for k, v in labels.items()}


def _check_labels(task: tasks_lib.TaskSpec, labels: dict[str, np.ndarray],
                  where: str, partial_labels: bool, whole: bool) -> None:
  """One task's labels: classes in range, targets finite, some labelled."""
  if task.name not in labels:
    raise errors.ConfigError(f"{where}: the examples carry no labels of "
                             f"task {task.name!r}")
  values = labels[task.name]
  masked = np.zeros(len(values), bool)
  if task.mask_key in labels:
    masked = ~labels[task.mask_key].reshape(len(values)).astype(bool)
  builtin_loss = task.loss_name != tasks_lib.CUSTOM_LOSS
  if task.kind == tasks_lib.CLASSIFICATION:
    if values.size != len(values):
      raise errors.ConfigError(
          f"{where}: task {task.name!r} has class labels of shape "
          f"{values.shape}: one class number per example expected")
    values = values.reshape(len(values)).astype(np.float64)
    missing = masked | ~(values >= 0)  # NaN classes count as missing too.
    fractional = values[~missing & (values % 1 != 0)]
    if fractional.size:
      raise errors.ConfigError(
          f"{where}: task {task.name!r} has class label {fractional[0]:g} "
          f"in {fractional.size} example(s); class labels are whole "
          "numbers")
    too_large = values[~missing & (values >= task.output_size)]
    if too_large.size:
      raise errors.ConfigError(
          f"{where}: task {task.name!r} has class label {too_large[0]:g} "
          f"in {too_large.size} example(s); its head has "
          f"{task.output_size} classes (0 to {task.output_size - 1})")
    what = "negative or NaN class labels"
  else:
    matrix = values.reshape(len(values), -1)
    if builtin_loss and matrix.shape[1] != task.output_size:
      raise errors.ConfigError(
          f"{where}: task {task.name!r} has targets of shape "
          f"{values.shape}, {matrix.shape[1]} number(s) per example; its "
          f"head predicts {task.output_size}")
    missing = masked | ~np.all(np.isfinite(matrix), axis=1)
    what = "NaN or Inf targets"
  if masked.any():
    what += f" or {task.mask_key} entries of 0"
  if missing.any() and not partial_labels:
    raise errors.ConfigError(
        f"{where}: task {task.name!r} has {what} in {int(missing.sum())} "
        "example(s); if they mark missing labels, pass --partial_labels")
  if missing.all() and whole:  # A first batch alone may just be unlucky.
    raise errors.ConfigError(
        f"{where}: no example carries a label of task {task.name!r}")
