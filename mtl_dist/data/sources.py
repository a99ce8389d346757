"""What a run trains on: example sources and a run's data.

An `ExampleSource` is an unbatched dataset of `(features, {task: label})`
pairs. Joint mode has one source labelled for every task; alternate mode has
one source per task, each its own pipeline. `MultiTaskData` is a run's
tasks with their training and eval sources.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import logging
import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist import typecheck

# Batches parsed and decoded at once (autotuning is off, see
# `pipelines._options`).
DECODE_CALLS = 2


@dataclasses.dataclass(frozen=True)
class ExampleSource:
  """An unbatched dataset of `(features, {task: label})` elements.

  Attributes:
    task_names: The labels every element carries.
    make_dataset: Builds the dataset; called once per input pipeline.
    num_examples: The number of elements.
    arrays: For in-memory sources, `(features, {task: labels})` NumPy arrays.
      They allow the index-based training pipeline (see `distribute_train`),
      whose batches are a function of (seed, step) alone.
    read: For file-backed sources, `read(input_context, seed, shuffle)`
      returns the input pipeline's own share of the examples (sharded by
      file where the files allow it), decoded and preprocessed, or, with
      `decode_batch`, still serialized.
    shuffle_buffer: Shuffle buffer of streamed training pipelines (default:
      all examples, at most 16384).
    decode_batch: If set (only with `read`), `read` yields undecoded records
      (e.g. serialized tf.train.Examples) and `decode_batch` maps a batch of
      them to `(features, {task: labels})`. Pipelines then shuffle the small
      records and parse and decode once per batch instead of once per
      example. `make_dataset` always yields decoded examples.
  """

  task_names: tuple[str, ...]
  make_dataset: Callable[[], tf.data.Dataset]
  num_examples: int
  arrays: Optional[tuple[np.ndarray, dict[str, np.ndarray]]] = None
  read: Optional[Callable[[Optional[tf.distribute.InputContext], int, bool],
                          tf.data.Dataset]] = None
  shuffle_buffer: Optional[int] = None
  decode_batch: Optional[Callable[[Any], tuple[tf.Tensor,
                                               dict[str, tf.Tensor]]]] = None

  def __post_init__(self):
    if self.decode_batch is not None and self.read is None:
      raise errors.ConfigError(
          "ExampleSource: decode_batch applies to what `read` "
          "yields; make_dataset must yield decoded examples")

  def decoded(self, dataset: tf.data.Dataset,
              batch_size: int) -> tf.data.Dataset:
    """Batches and decodes what `read` yields.

    Args:
      dataset: Elements of `read`.
      batch_size: Examples per batch.

    Returns:
      Batches of `(features, {task: labels})`.
    """
    if self.decode_batch is None:
      return dataset.batch(batch_size)
    return dataset.batch(batch_size).map(self.decode_batch,
                                         num_parallel_calls=DECODE_CALLS)


@dataclasses.dataclass(frozen=True)
class MultiTaskData:
  """What a run trains and evaluates on.

  Attributes:
    tasks: The trained tasks, in order (a list or tuple of `TaskSpec`).
    input_shape: Shape of one example's features, without the batch
      dimension.
    train: Joint mode: one source labelled for every task (the source
      itself, or a one-element list or tuple). Alternate mode: one source
      per task, in task order (a list or tuple).
    eval: Sources for evaluation: one source, or a list or tuple of them,
      that together cover every task.
    partial_labels: Whether training examples may lack some tasks' labels
      (see `TaskSpec.label_mask`).

  Raises:
    ConfigError: Naming the attribute that is not of these types. (Whether
      the sources fit the mode is checked when a run starts.)
  """

  tasks: tuple[tasks_lib.TaskSpec, ...]
  input_shape: tuple[int, ...]
  train: Union[ExampleSource, tuple[ExampleSource, ...]]
  eval: Union[ExampleSource, tuple[ExampleSource, ...]]
  partial_labels: bool = False

  def __post_init__(self):
    tasks = _as_tuple(self.tasks, tasks_lib.TaskSpec, "tasks",
                      "mtl_dist.TaskSpec")
    if not tasks:
      raise errors.ConfigError("MultiTaskData.tasks: give at least one "
                               "mtl_dist.TaskSpec")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
      raise errors.ConfigError(f"MultiTaskData.tasks: task names repeat in "
                               f"{names}")
    object.__setattr__(self, "tasks", tasks)
    object.__setattr__(self, "input_shape", _shape(self.input_shape))
    for field in ("train", "eval"):
      sources = _as_tuple(getattr(self, field), ExampleSource, field,
                          "source (mtl_dist.source_from_arrays or "
                          "source_from_dataset)")
      object.__setattr__(self, field, sources)
    typecheck.check(self.partial_labels, bool,
                    "MultiTaskData.partial_labels")


def _as_tuple(value: Any, kind: type, field: str, described: str) -> tuple:
  """`value` (one `kind` or a list or tuple of them) as a tuple.

  Raises:
    ConfigError: Naming `MultiTaskData.<field>` and what it takes.
  """
  items = (value,) if isinstance(value, kind) else value
  if not isinstance(items, (list, tuple)) or not all(
      isinstance(item, kind) for item in items):
    wrong = next((item for item in items if not isinstance(item, kind)),
                 None) if isinstance(items, (list, tuple)) else value
    raise errors.ConfigError(
        f"MultiTaskData.{field}: expects a {described} or a list of them, "
        f"got {typecheck.kind_of(wrong)}")
  return tuple(items)


def _shape(value: Any) -> tuple[int, ...]:
  """`value` as a shape of positive ints.

  Raises:
    ConfigError: Naming `MultiTaskData.input_shape`.
  """
  try:
    shape = tuple(value)
    if all(int(d) == d and int(d) > 0 for d in shape) and shape:
      return tuple(int(d) for d in shape)
  except (TypeError, ValueError):
    pass
  shown = " ".join(repr(value).split())[:60]
  raise errors.ConfigError(
      f"MultiTaskData.input_shape={shown}: expects one example's shape "
      "without the batch dimension, a non-empty tuple of positive ints such "
      "as features.shape[1:]")


def source_from_arrays(
    features: np.ndarray,
    labels: Union[Mapping[str, np.ndarray], np.ndarray],
    task_names: Sequence[str]) -> ExampleSource:
  """An in-memory source over NumPy arrays.

  Args:
    features: [N, ...] inputs.
    labels: Task name to [N, ...] labels; may also hold `<task>_mask` arrays
      marking which examples carry that task's label. For one task, its
      [N, ...] label array alone.
    task_names: The tasks to keep labels (and masks) for, a list of names.

  Returns:
    The source.

  Raises:
    ConfigError: For task names given as one string, or one label array
      for several tasks. (A task without labels is named by the data
      check before training.)
  """
  if isinstance(task_names, str):
    raise errors.ConfigError(
        f"source_from_arrays: task_names={task_names!r} must be a list of "
        f"task names, e.g. [{task_names!r}]")
  try:
    features = np.asarray(features)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(
        f"source_from_arrays: features: not an array ({e})") from None
  if features.ndim < 1 or features.dtype == object:
    raise errors.ConfigError(
        "source_from_arrays: features must be an [N, ...] array of numbers, "
        f"got shape {features.shape} and dtype {features.dtype}")
  if not isinstance(labels, Mapping):
    if len(task_names) != 1:
      raise errors.ConfigError(
          f"source_from_arrays: labels must be a dict of task name to label "
          f"array for the {len(task_names)} tasks {list(task_names)} (a "
          "single array is taken for one task only)")
    labels = {task_names[0]: np.asarray(labels)}
  kept = {key: values for key, values in labels.items()
          if key in task_names or
          (key.endswith("_mask") and key[:-len("_mask")] in task_names)}
  kept = {key: np.asarray(values) for key, values in kept.items()}
  for name, values in kept.items():
    if values.ndim < 1 or len(values) != len(features):
      raise errors.ConfigError(
          f"source_from_arrays: labels of {name!r} have shape "
          f"{values.shape}, not {len(features)} rows like the features")
  return ExampleSource(
      task_names=tuple(task_names),
      make_dataset=lambda: tf.data.Dataset.from_tensor_slices((features, kept)),
      num_examples=len(features), arrays=(features, kept))


@typecheck.checked
def source_from_dataset(
    dataset: Union[tf.data.Dataset, Callable[[], tf.data.Dataset]],
    task_names: Sequence[str],
    num_examples: Optional[int] = None) -> ExampleSource:
  """A streamed source over a user's finite, unbatched tf.data dataset.

  Training pipelines shard it per input pipeline, shuffle it with a seeded
  buffer and repeat it; evaluation reads it once.

  Args:
    dataset: A dataset, or a function making one (called once per input
      pipeline), of `(features, {task: label})` elements; for a single task
      `(features, label)` elements are accepted too.
    task_names: The tasks its elements are labelled for.
    num_examples: Its size; default: its cardinality when tf.data knows it,
      else counted by reading it once.

  Returns:
    The source.

  Raises:
    ValueError: If the elements are not `(features, labels)` pairs, or
      lack a label of `task_names`, or the dataset is infinite.
  """
  task_names = tuple(task_names)
  make = dataset if callable(dataset) else (lambda: dataset)
  spec = make().element_spec
  if not isinstance(spec, tuple) or len(spec) != 2:
    raise errors.ConfigError(
        "the dataset's elements must be (features, labels) "
        f"pairs, got {spec}")
  if not isinstance(spec[1], dict):
    if len(task_names) != 1:
      raise errors.ConfigError(
          "elements with one label need exactly one task, got "
          f"{list(task_names)}")
    name = task_names[0]
    plain = make
    make = lambda: plain().map(lambda x, y: (x, {name: y}))
  else:
    missing = [name for name in task_names if name not in spec[1]]
    if missing:
      raise errors.ConfigError(
          f"the dataset's labels lack task(s) {missing} (it has "
          f"{sorted(spec[1])})")
  if num_examples is None:
    cardinality = int(make().cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
      raise errors.ConfigError(
          "the dataset is infinite; give a finite one (the "
          "pipelines repeat it themselves)")
    num_examples = cardinality if cardinality >= 0 else _count(make)
  return ExampleSource(task_names=task_names, make_dataset=make,
                       num_examples=num_examples)


# The most examples a dataset of unknown size is counted to: a dataset that
# repeats forever is refused there, instead of being counted forever.
MAX_COUNTED = 2**31 - 1
_COUNT_BATCH = 2**14
_COUNT_LOG_SECONDS = 10.0


def _count(make: Callable[[], tf.data.Dataset]) -> int:
  """Counts a dataset's examples by reading it once, logging progress.

  Raises:
    ConfigError: If it holds more than MAX_COUNTED examples (one that
      repeats forever).
  """
  # Ones, not the examples, are batched: the count holds no batch of them.
  sizes = make().map(lambda *example: tf.constant(1, tf.int64)).batch(
      _COUNT_BATCH).map(tf.reduce_sum)
  count, logged = 0, time.monotonic()
  for size in sizes:
    count += int(size)
    if count > MAX_COUNTED:
      raise errors.ConfigError(
          f"the dataset of unknown size did not end within {MAX_COUNTED} "
          "examples (does it repeat?); give a finite dataset, or its size "
          "as num_examples")
    if time.monotonic() - logged > _COUNT_LOG_SECONDS:
      logging.info("Counting the examples of a dataset of unknown size: %d "
                   "so far (num_examples= skips this).", count)
      logged = time.monotonic()
  return count


def input_dtype(data: MultiTaskData) -> tf.DType:
  """The dtype of the model's inputs (every source has the same)."""
  source = data.train[0]
  if source.arrays is not None:
    return tf.as_dtype(source.arrays[0].dtype)
  return source.make_dataset().element_spec[0].dtype
