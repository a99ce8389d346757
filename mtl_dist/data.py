"""Per-task input pipelines under a tf.distribute strategy.

An `ExampleSource` is an unbatched dataset of `(features, {task: label})`
pairs. Joint mode has one source labelled for every task; alternate mode has
one source per task, each its own pipeline. `distribute_train` and
`distribute_eval` turn a source into a distributed dataset with
`strategy.distribute_datasets_from_function`: each input pipeline reads its own
shard and batches with the per-replica share of the global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from mtl_dist import config as config_lib
from mtl_dist import errors
from mtl_dist import shapes
from mtl_dist import tasks as tasks_lib
from mtl_dist import toy_regression

_MAX_SHUFFLE_BUFFER = 16384
# Batches parsed and decoded at once (autotuning is off, see `_options`).
_DECODE_CALLS = 2


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
      raise ValueError("ExampleSource: decode_batch applies to what `read` "
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
                                         num_parallel_calls=_DECODE_CALLS)


@dataclasses.dataclass(frozen=True)
class MultiTaskData:
  """What a run trains and evaluates on.

  Attributes:
    tasks: The trained tasks, in order.
    input_shape: Shape of one example's features.
    train: Joint mode: one source labelled for every task. Alternate mode:
      one source per task, in task order.
    eval: Sources for evaluation, laid out like `train`.
    partial_labels: Whether training examples may lack some tasks' labels
      (see `TaskSpec.label_mask`).
  """

  tasks: tuple[tasks_lib.TaskSpec, ...]
  input_shape: tuple[int, ...]
  train: tuple[ExampleSource, ...]
  eval: tuple[ExampleSource, ...]
  partial_labels: bool = False


def source_from_arrays(features: np.ndarray, labels: dict[str, np.ndarray],
                       task_names: Sequence[str]) -> ExampleSource:
  """An in-memory source over NumPy arrays.

  Args:
    features: [N, ...] inputs.
    labels: Task name to [N, ...] labels; may also hold `<task>_mask` arrays
      marking which examples carry that task's label.
    task_names: The tasks to keep labels (and masks) for.

  Returns:
    The source.
  """
  kept = {key: values for key, values in labels.items()
          if key in task_names or
          (key.endswith("_mask") and key[:-len("_mask")] in task_names)}
  for name, values in kept.items():
    if len(values) != len(features):
      raise ValueError(f"labels of {name!r} have {len(values)} rows, the "
                       f"features {len(features)}")
  return ExampleSource(
      task_names=tuple(task_names),
      make_dataset=lambda: tf.data.Dataset.from_tensor_slices((features, kept)),
      num_examples=len(features), arrays=(features, kept))


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
    raise ValueError("the dataset's elements must be (features, labels) "
                     f"pairs, got {spec}")
  if not isinstance(spec[1], dict):
    if len(task_names) != 1:
      raise ValueError("elements with one label need exactly one task, got "
                       f"{list(task_names)}")
    name = task_names[0]
    plain = make
    make = lambda: plain().map(lambda x, y: (x, {name: y}))
  else:
    missing = [name for name in task_names if name not in spec[1]]
    if missing:
      raise ValueError(f"the dataset's labels lack task(s) {missing} (it has "
                       f"{sorted(spec[1])})")
  if num_examples is None:
    cardinality = int(make().cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
      raise ValueError("the dataset is infinite; give a finite one (the "
                       "pipelines repeat it themselves)")
    num_examples = (cardinality if cardinality >= 0 else
                    int(make().reduce(0, lambda count, _: count + 1)))
  return ExampleSource(task_names=task_names, make_dataset=make,
                       num_examples=num_examples)


def check_layout(data: MultiTaskData, mode: str) -> None:
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


def input_dtype(data: MultiTaskData) -> tf.DType:
  """The dtype of the model's inputs (every source has the same)."""
  source = data.train[0]
  if source.arrays is not None:
    return tf.as_dtype(source.arrays[0].dtype)
  return source.make_dataset().element_spec[0].dtype


def load(config: config_lib.TrainConfig) -> MultiTaskData:
  """Loads the dataset named by `config.dataset` for the configured mode.

  Args:
    config: A validated run configuration.

  Returns:
    The run's data.

  Raises:
    ConfigError: For an unknown dataset or task.
  """
  if config.uses_tfds:
    from mtl_dist import tfds_data  # pylint: disable=g-import-not-at-top
    if config.mode == "joint":
      return tfds_data.load_joint(config)
    return tfds_data.load_alternate(config)
  if config.dataset == "toy_regression":
    return _load_toy_regression(config)
  if config.dataset != "shapes":
    raise errors.ConfigError(
        f"--dataset={config.dataset}: unknown dataset (known: shapes, "
        "toy_regression, tfds:NAME)")
  names, tasks = _chosen_tasks(config, shapes.TASKS)
  if config.mode == "joint":
    sizes = [config.resolved_train_examples]
  else:
    sizes_by_task = dict(shapes.default_task_sizes(names))
    sizes_by_task.update(config.task_sizes or {})
    sizes = [sizes_by_task[name] for name in names]
  # One pool cut into disjoint pieces: training sets first, then eval.
  features, labels = shapes.generate(sum(sizes) + config.resolved_eval_examples,
                                     config.seed)
  if config.label_fraction:
    labels = shapes.drop_labels(labels, config.label_fraction,
                                num_examples=sizes[0], seed=config.seed)
  bounds = np.cumsum([0] + sizes)
  eval_part = slice(bounds[-1], None)

  def cut(part: slice, task_names: Sequence[str]) -> ExampleSource:
    return source_from_arrays(features[part],
                              {k: v[part] for k, v in labels.items()},
                              task_names)

  if config.mode == "joint":
    train = (cut(slice(0, bounds[1]), names),)
    evaluation = (cut(eval_part, names),)
  else:
    train = tuple(cut(slice(bounds[i], bounds[i + 1]), [name])
                  for i, name in enumerate(names))
    evaluation = tuple(cut(eval_part, [name]) for name in names)
  return MultiTaskData(tasks=tasks, input_shape=features.shape[1:],
                       train=train, eval=evaluation,
                       partial_labels=bool(config.label_fraction))


def _chosen_tasks(
    config: config_lib.TrainConfig, known: Sequence[tasks_lib.TaskSpec]
) -> tuple[list[str], tuple[tasks_lib.TaskSpec, ...]]:
  """The configured tasks among a dataset's, with their --task_weights."""
  names = config.validate_tasks([task.name for task in known])
  specs = {task.name: task for task in known}
  return names, tuple(specs[name].with_weight(config.weight_of(name))
                      for name in names)


def _load_toy_regression(config: config_lib.TrainConfig) -> MultiTaskData:
  """The GradNorm paper's synthetic regression tasks (joint mode)."""
  names, tasks = _chosen_tasks(config, toy_regression.TASKS)
  num_train = config.resolved_train_examples
  features, labels = toy_regression.generate(
      num_train + config.resolved_eval_examples, config.seed)
  train = source_from_arrays(features[:num_train],
                             {k: v[:num_train] for k, v in labels.items()},
                             names)
  evaluation = source_from_arrays(features[num_train:],
                                  {k: v[num_train:] for k, v in labels.items()},
                                  names)
  return MultiTaskData(tasks=tasks, input_shape=features.shape[1:],
                       train=(train,), eval=(evaluation,))


def input_options(
    strategy: tf.distribute.Strategy) -> Optional[tf.distribute.InputOptions]:
  """How input is laid out over the strategy's replicas.

  On CPU devices every replica gets its own input pipeline, read on the host
  (PER_REPLICA without fetching to the device). TensorFlow's default layout,
  one pipeline per worker feeding per-device prefetch iterators, is kept for
  GPUs, where the prefetch hides copies; on CPUs it only adds per-device
  iterators whose tf.data autotuning threads make every iterator deletion
  wait seconds to a minute (the wait doubles as the iterator ages).

  Args:
    strategy: The distribution strategy.

  Returns:
    Options for `distribute_datasets_from_function`, or None for the default.
  """
  devices = getattr(strategy.extended, "worker_devices", ())
  if (isinstance(strategy, tf.distribute.MirroredStrategy) and
      all("CPU" in device.upper() for device in devices)):
    return tf.distribute.InputOptions(
        experimental_replication_mode=(
            tf.distribute.InputReplicationMode.PER_REPLICA),
        experimental_fetch_to_device=False)
  return None


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Each input pipeline shards itself below; no automatic sharding.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  options.deterministic = True
  # Autotuning runs a background thread per iterator that iterator deletion
  # waits for (see `input_options`); parallelism is set explicitly instead.
  options.autotune.enabled = False
  return options


def _replica_batches_per_step(ctx: tf.distribute.InputContext,
                              global_batch_size: int) -> tuple[int, int]:
  """(per-replica batch size, per-replica batches each pipeline yields)."""
  per_replica = ctx.get_per_replica_batch_size(global_batch_size)
  replicas = global_batch_size // per_replica
  if replicas % ctx.num_input_pipelines:
    raise ValueError(f"{replicas} replicas cannot be split evenly over "
                     f"{ctx.num_input_pipelines} input pipelines")
  return per_replica, replicas // ctx.num_input_pipelines


def _global_index_stream(num_examples: int, seed: int,
                         start_position: int) -> tf.data.Dataset:
  """Example indices in training order, from `start_position` on.

  Epoch e visits every index once, in the order of a stateless permutation
  seeded by (seed, e): the stream is a pure function of the seed, so every
  input pipeline, replica and worker derives the same one, and a restart can
  begin at any position.
  """
  first_epoch, skip = divmod(start_position, num_examples)

  def epoch_indices(epoch: tf.Tensor) -> tf.data.Dataset:
    permutation = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
    return tf.data.Dataset.from_tensor_slices(permutation)

  return (tf.data.Dataset.counter(first_epoch)
          .flat_map(epoch_indices).skip(skip))


def distribute_train(strategy: tf.distribute.Strategy, source: ExampleSource,
                     global_batch_size: int, seed: int, start_step: int = 0,
                     exact_resume: bool = False
                    ) -> tf.distribute.DistributedDataset:
  """An endless, shuffled training pipeline for one source.

  In-memory sources (with `arrays`) use an index-based pipeline: step k's
  global batch is the k-th run of `global_batch_size` indices of a seeded
  per-epoch permutation, and each input pipeline gathers only its replicas'
  part of it. Any number of replicas, pipelines or workers therefore consume
  exactly the examples one device would with the same global batch, and a
  run resumed at `start_step` continues the same sequence. Other sources are
  sharded per input pipeline and shuffled with a seeded buffer.

  Args:
    strategy: The distribution strategy.
    source: What to read.
    global_batch_size: Examples per step over all replicas.
    seed: The shuffle seed.
    start_step: The step the pipeline starts at. The index-based pipeline
      continues exactly. A streamed one starts a new order seeded by
      (seed, start_step), not the continuation of the interrupted one,
      unless `exact_resume` is set.
    exact_resume: Streamed sources: rebuild the interrupted pipeline and skip
      the batches it had served (exact, at the cost of reading them again).

  Returns:
    A distributed dataset of per-replica batches.
  """

  def indexed_dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica, batches = _replica_batches_per_step(ctx, global_batch_size)
    own = per_replica * batches  # This pipeline's share of a global batch.
    offset = ctx.input_pipeline_id * own
    features, labels = (tf.constant(source.arrays[0]),
                        {k: tf.constant(v) for k, v in source.arrays[1].items()})

    def gather(indices: tf.Tensor):
      return (tf.gather(features, indices),
              {k: tf.gather(v, indices) for k, v in labels.items()})

    dataset = _global_index_stream(source.num_examples, seed,
                                   start_step * global_batch_size)
    dataset = dataset.batch(global_batch_size, drop_remainder=True)
    dataset = dataset.map(
        lambda ids: tf.reshape(ids[offset:offset + own],
                               [batches, per_replica])).unbatch()
    dataset = dataset.map(gather, num_parallel_calls=2, deterministic=True)
    return dataset.prefetch(2).with_options(_options())

  # A streamed pipeline cannot seek. It is rebuilt and fast-forwarded
  # (exact_resume), or started in an order seeded by the start step, which at
  # least keeps it from replaying the examples it began with.
  streamed_seed = seed if exact_resume else seed + 1_000_003 * start_step

  def streamed_dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    if source.read is not None:
      dataset = source.read(ctx, streamed_seed, True)
    else:
      dataset = source.make_dataset().shard(ctx.num_input_pipelines,
                                            ctx.input_pipeline_id)
    buffer = source.shuffle_buffer or min(source.num_examples,
                                          _MAX_SHUFFLE_BUFFER)
    dataset = dataset.shuffle(buffer, seed=streamed_seed,
                              reshuffle_each_iteration=True).repeat()
    per_replica, batches = _replica_batches_per_step(ctx, global_batch_size)
    dataset = dataset.batch(per_replica, drop_remainder=True)
    if exact_resume and start_step:  # Before decoding: skipping is cheap.
      dataset = dataset.skip(start_step * batches)
    if source.read is not None and source.decode_batch is not None:
      dataset = dataset.map(source.decode_batch,
                            num_parallel_calls=_DECODE_CALLS)
    return dataset.prefetch(2).with_options(_options())

  dataset_fn = (indexed_dataset_fn if source.arrays is not None
                else streamed_dataset_fn)
  return strategy.distribute_datasets_from_function(dataset_fn,
                                                    input_options(strategy))


def distribute_eval(strategy: tf.distribute.Strategy, source: ExampleSource,
                    global_batch_size: int,
                    max_batches: int) -> tf.distribute.DistributedDataset:
  """A finite evaluation pipeline: the whole source, or `max_batches` batches.

  The last batches may be partial or missing on some replicas; evaluation
  sums over examples, so that does not bias the result.

  Args:
    strategy: The distribution strategy.
    source: What to read.
    global_batch_size: Examples per step over all replicas.
    max_batches: Global batches to read; 0 reads the whole source.

  Returns:
    A distributed dataset of per-replica batches.
  """

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    if source.read is not None:  # Sharded by the source; take per pipeline.
      dataset = source.read(ctx, 0, False)
      if max_batches:
        dataset = dataset.take(max_batches * global_batch_size //
                               ctx.num_input_pipelines)
      dataset = source.decoded(
          dataset, ctx.get_per_replica_batch_size(global_batch_size))
    else:
      dataset = source.make_dataset()
      if max_batches:
        dataset = dataset.take(max_batches * global_batch_size)
      dataset = dataset.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
      dataset = dataset.batch(
          ctx.get_per_replica_batch_size(global_batch_size))
    return dataset.prefetch(2).with_options(_options())

  return strategy.distribute_datasets_from_function(dataset_fn,
                                                    input_options(strategy))


_FIRST_BATCH = 256  # Examples of a streamed source checked before training.


def check(data: MultiTaskData, partial_labels: bool) -> None:
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
  for split, sources in (("training", data.train), ("eval", data.eval)):
    for source in sources:
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


def _first_examples(source: ExampleSource, where: str):
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
  if task.kind == tasks_lib.CLASSIFICATION:
    values = values.reshape(len(values)).astype(np.float64)
    missing = masked | ~(values >= 0)  # NaN classes count as missing too.
    too_large = values[~missing & (values >= task.output_size)]
    if too_large.size:
      raise errors.ConfigError(
          f"{where}: task {task.name!r} has class label {too_large[0]:g} "
          f"in {too_large.size} example(s); its head has "
          f"{task.output_size} classes (0 to {task.output_size - 1})")
    what = "negative or NaN class labels"
  else:
    matrix = values.reshape(len(values), -1)
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
