"""Datasets from TensorFlow Datasets (TFDS), read without downloading.

Joint mode reads several label features of one dataset as tasks
(`--dataset=tfds:NAME --tasks=label_a,label_b`); alternate mode gives each
task its own dataset and label (`--task_datasets=a=tfds:NAME:LABEL,...`).
A task's kind and size come from the feature spec: a ClassLabel is a
classification with its class count, a bool a binary classification, and an
integer or float scalar or vector without class names a regression.
Nested features are named by path (`attributes/Smiling`); the task is named
by the last component (`Smiling`).

Nothing is downloaded unless `download=True`: a dataset that is not prepared
in the data directory is a ConfigError naming both.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Optional, Sequence

from absl import logging
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.data import settings
from mtl_dist.data import sources
from mtl_dist.data import tfds_features

PREFIX = settings.TFDS_PREFIX
_SHUFFLE_BUFFER_BYTES = 256 * 2**20
_MAX_SHUFFLE_BUFFER = 10000
_BATCH_OF_CHECKS = 256  # Batch size when examples are decoded for checks.
# What `_TfdsDataset.records` passes to TFDS's private `reader._read_files`.
_READ_FILES_PARAMETERS = frozenset({"file_instructions", "read_config",
                                    "shuffle_files", "disable_shuffling",
                                    "file_format"})


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


class _TfdsDataset:
  """One prepared TFDS dataset, its splits and its feature spec."""

  def __init__(self, name: str, data_dir: Optional[str], download: bool,
               flag: str = "--dataset"):
    """Opens the dataset.

    Args:
      name: Its TFDS name.
      data_dir: Where TFDS keeps prepared datasets (None: its default).
      download: Download and prepare it if it is not prepared.
      flag: The flag that named it, for messages.

    Raises:
      ConfigError: If TFDS has no such dataset.
    """
    tfds = _tfds()
    self.name = name
    self._data_dir = data_dir
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      if "not found" not in str(e).lower():
        raise
      raise errors.ConfigError(
          f"{flag}: TFDS has no dataset {name!r} "
          f"({str(e).splitlines()[0][:200]})") from None
    if download:
      logging.info("Downloading and preparing %s (--download).", name)
      self.builder.download_and_prepare()

  @property
  def features(self) -> Any:
    return self.builder.info.features

  def _where(self) -> str:
    if self._data_dir:
      return f"--data_dir={self._data_dir}"
    return f"the default data_dir {_tfds().core.constants.DATA_DIR}"

  def open(self, split: str, flag: str, **kwargs) -> tf.data.Dataset:
    """`builder.as_dataset`, with errors that name the dataset and flag."""
    try:
      return self.builder.as_dataset(split=split, **kwargs)
    except AssertionError as e:
      if "could not find data" not in str(e):
        raise
      raise errors.ConfigError(
          f"dataset {self.name} is not prepared in {self._where()}: prepare "
          "it there (e.g. `tfds build`), or pass --download to fetch it"
      ) from None
    except ValueError as e:
      if "unknown split" not in str(e).lower():
        raise
      known = ", ".join(self.builder.info.splits.keys()) or "unknown"
      raise errors.ConfigError(
          f"--{flag}={split}: no such split of {self.name} (splits: "
          f"{known})") from None

  def records(self, split: str, flag: str, *, shuffle_files: bool,
              read_config: Any) -> tf.data.Dataset:
    """The split's serialized examples, read as `open` reads them, unparsed."""
    from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import reader  # pylint: disable=g-import-not-at-top
    self.open(split, flag)  # Its errors name the dataset and the flag.
    return reader._read_files(  # pylint: disable=protected-access
        file_instructions=self.file_instructions(split),
        read_config=read_config, shuffle_files=shuffle_files,
        disable_shuffling=self.builder.info.disable_shuffling,
        file_format=file_adapters.FileFormat.TFRECORD)

  def file_instructions(self, split: str) -> list[Any]:
    """The files (and ranges in them) a split reads; [] if unknown."""
    try:
      return list(self.builder.info.splits[split].file_instructions)
    except (KeyError, ValueError, AttributeError):
      return []  # E.g. tfds.testing.mock_data, which has no files.

  def num_examples(self, split: str, flag: str) -> int:
    try:
      count = self.builder.info.splits[split].num_examples
    except (KeyError, ValueError):
      count = 0
    if not count:  # Metadata without split sizes: count once.
      count = int(self.open(split, flag).reduce(0, lambda n, _: n + 1))
    if not count:
      raise errors.ConfigError(
          f"--{flag}={split}: split of {self.name} is empty")
    return count


def _make_source(dataset: _TfdsDataset, split: str, flag: str,
                 prep: tfds_features.Preprocessing, label_paths: dict[str, str],
                 tasks: Sequence[tasks_lib.TaskSpec],
                 input_shape: tuple[int, ...],
                 batched_parsing: bool = True) -> sources.ExampleSource:
  """An ExampleSource that reads, decodes and preprocesses one split."""
  dataset.open(split, flag)  # Fails now, before training, if unreadable.
  num_examples = dataset.num_examples(split, flag)
  kinds = {task.name: task for task in tasks}

  def to_example(raw: dict[str, Any], batched: bool = False):
    labels = {}
    for name, path in label_paths.items():
      value = tfds_features.value_at(raw, path)
      if kinds[name].kind == tasks_lib.CLASSIFICATION:
        labels[name] = tf.cast(value, tf.int32)
      else:
        labels[name] = tf.reshape(tf.cast(value, tf.float32),
                                  [tf.shape(value)[0], -1] if batched else [-1])
    return prep.apply(tfds_features.value_at(raw, prep.input_key)), labels

  parse_batch = (_batch_parser(dataset, [prep.input_key,
                                         *label_paths.values()])
                 if batched_parsing and dataset.file_instructions(split)
                 else None)

  def read(ctx: Optional[tf.distribute.InputContext], seed: int,
           shuffle: bool) -> tf.data.Dataset:
    tfds = _tfds()
    pipelines = ctx.num_input_pipelines if ctx else 1
    read_config = tfds.ReadConfig(
        shuffle_seed=seed, interleave_cycle_length=tf.data.AUTOTUNE,
        num_parallel_calls_for_interleave_files=tf.data.AUTOTUNE,
        try_autocache=False, input_context=ctx if pipelines > 1 else None)
    read_split = dataset.records if parse_batch else dataset.open
    try:  # File-level sharding: each pipeline reads its own files.
      raw = read_split(split, flag, shuffle_files=shuffle,
                       read_config=read_config)
    except ValueError as e:
      if "Cannot shard" not in str(e):
        raise
      # Fewer files than pipelines: every pipeline keeps its examples.
      read_config = dataclasses.replace(read_config, input_context=None)
      raw = read_split(split, flag, shuffle_files=shuffle,
                       read_config=read_config)
      raw = raw.shard(pipelines, ctx.input_pipeline_id)
    if parse_batch:
      return raw  # Serialized; parsed and decoded per batch.
    return raw.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)

  def decode_batch(records: tf.Tensor):
    return to_example(parse_batch(records), batched=True)

  example_bytes = 4 * math.prod(input_shape)
  source = sources.ExampleSource(
      task_names=tuple(label_paths),
      make_dataset=lambda: source.decoded(read(None, 0, False),
                                          _BATCH_OF_CHECKS).unbatch(),
      num_examples=num_examples, read=read,
      shuffle_buffer=max(1, min(num_examples, _MAX_SHUFFLE_BUFFER,
                                _SHUFFLE_BUFFER_BYTES // example_bytes)),
      decode_batch=decode_batch if parse_batch else None)
  return source


def _batch_parser(dataset: _TfdsDataset, paths: Sequence[str]):
  """Parses and decodes batches of serialized examples, if the files allow it.

  TFDS parses each example on its own (`tf.io.parse_single_example`) before
  batching. Parsing a whole batch with `tf.io.parse_example`, and only the
  features a run uses, is several times faster (on 32x32 PNG images the
  pipeline alone went from ~22k to ~96k examples/s on 2 cores; for training
  see docs/benchmarks.md, comparison 3) and lets pipelines shuffle the small
  serialized records instead of decoded tensors. That needs TFRecord files and features
  of fixed shape; for anything else this returns None and TFDS's own
  per-example path is used.

  Args:
    dataset: The opened dataset.
    paths: The features to parse (input and labels), by path.

  Returns:
    `parse(records) -> {path: decoded batch}`, or None.
  """
  # TFDS's reader internals (tensorflow-datasets 4.9): if a release changes
  # them, fall back to its public per-example path rather than fail.
  try:
    from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import reader  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import utils  # pylint: disable=g-import-not-at-top
    read_files = reader._read_files  # pylint: disable=protected-access
    parameters = inspect.signature(read_files).parameters
  except (ImportError, AttributeError, TypeError, ValueError):
    return None
  if not _READ_FILES_PARAMETERS <= set(parameters):
    return None
  info = dataset.builder.info
  file_format = info.file_format or file_adapters.DEFAULT_FILE_FORMAT
  if (file_adapters.FileFormat.from_value(file_format) !=
      file_adapters.FileFormat.TFRECORD):
    return None
  serialized = utils.flatten_nest_dict(info.features.get_serialized_info())
  tensor_info_type = _tfds().features.TensorInfo
  infos, connectors = {}, {}
  for path in dict.fromkeys(paths):
    tensor_info = serialized.get(path)
    connector = tfds_features.feature_at(info.features, path, dataset.name)
    if (not isinstance(tensor_info, tensor_info_type) or
        None in tensor_info.shape or tensor_info.sequence_rank or
        None in connector.shape):
      return None
    infos[path], connectors[path] = tensor_info, connector
  specs = example_parser.ExampleParser(infos).flat_feature_specs
  if not all(isinstance(spec, tf.io.FixedLenFeature)
             for spec in specs.values()):
    return None

  def parse(records: tf.Tensor) -> dict[str, tf.Tensor]:
    parsed = tf.io.parse_example(records, specs)
    return {path: connectors[path].decode_batch_example(
        tf.cast(parsed[path], infos[path].tf_dtype)) for path in infos}

  return parse


def _preprocessing(config: settings.DataConfig) -> tfds_features.Preprocessing:
  image_size = tuple(config.image_size) if config.image_size else None
  return tfds_features.Preprocessing(config.input_key, image_size,
                                     config.channels)


def load_joint(config: settings.DataConfig,
               batched_parsing: bool = True) -> sources.MultiTaskData:
  """Label features of one TFDS dataset as tasks (`--dataset=tfds:NAME`).

  Args:
    config: A validated configuration with `dataset=tfds:NAME`.
    batched_parsing: Parse TFRecord files per batch where possible (see
      `_batch_parser`); False keeps TFDS's per-example decoding (the
      benchmarks compare the two).

  Returns:
    The run's data.
  """
  name = config.dataset[len(PREFIX):]
  if not config.tasks:
    raise errors.ConfigError(
        f"--tasks: name the label features of {name} to train on")
  dataset = _TfdsDataset(name, config.data_dir, config.download)
  label_paths = {}
  for path in config.tasks:
    task_name = path.rsplit("/", 1)[-1]
    if task_name in label_paths:
      raise errors.ConfigError(
          f"--tasks={','.join(config.tasks)}: two tasks are named "
          f"{task_name!r}")
    label_paths[task_name] = path
  config.check_known(list(label_paths))
  tasks = tuple(
      tfds_features.task_from_feature(
          task, tfds_features.feature_at(dataset.features, path, name)
      ).with_weight(config.weight_of(task))
      for task, path in label_paths.items())
  prep = _preprocessing(config)
  input_shape = prep.output_shape(
      tfds_features.feature_at(dataset.features, prep.input_key, name), name)
  train = _make_source(dataset, config.split, "split", prep,
                       label_paths, tasks, input_shape, batched_parsing)
  evaluation = _make_source(dataset, config.eval_split, "eval_split",
                            prep, label_paths, tasks, input_shape,
                            batched_parsing)
  return sources.MultiTaskData(tasks=tasks, input_shape=input_shape,
                                train=(train,), eval=(evaluation,),
                                partial_labels=False)


def load_alternate(config: settings.DataConfig,
                   batched_parsing: bool = True) -> sources.MultiTaskData:
  """One TFDS dataset per task (`--task_datasets=a=tfds:NAME:LABEL,...`).

  Args:
    config: A validated configuration with `task_datasets`.
    batched_parsing: As for `load_joint`.

  Returns:
    The run's data.
  """
  specs = {task: tfds_features.parse_task_dataset(task, spec)
           for task, spec in config.task_datasets.items()}
  names = list(config.tasks) if config.tasks else list(specs)
  for task in names:
    if task not in specs:
      raise errors.ConfigError(
          f"--tasks={','.join(names)}: {task!r} has no entry in "
          "--task_datasets")
  config.check_known(names)
  prep = _preprocessing(config)
  opened: dict[str, _TfdsDataset] = {}
  tasks, shapes = [], {}
  for task in names:
    name, label = specs[task]
    if name not in opened:
      opened[name] = _TfdsDataset(name, config.data_dir, config.download,
                                  flag=f"--task_datasets: {task}")
    feature = tfds_features.feature_at(opened[name].features, label, name)
    tasks.append(tfds_features.task_from_feature(task, feature))
    shapes[task] = prep.output_shape(
        tfds_features.feature_at(opened[name].features, prep.input_key,
                                 name), name)
  if len(set(shapes.values())) > 1:
    listed = "; ".join(f"{task} ({specs[task][0]}): {shape}"
                       for task, shape in shapes.items())
    raise errors.ConfigError(
        f"--task_datasets: inputs disagree after preprocessing: {listed}. "
        "Make them agree with --image_size and --channels")
  input_shape = shapes[names[0]]
  train, evaluation = [], []
  for task in tasks:
    name, label = specs[task.name]
    for split, flag, out in ((config.split, "split", train),
                             (config.eval_split, "eval_split",
                              evaluation)):
      out.append(_make_source(opened[name], split, flag, prep,
                              {task.name: label}, [task], input_shape,
                              batched_parsing))
  return sources.MultiTaskData(tasks=tuple(tasks), input_shape=input_shape,
                                train=tuple(train), eval=tuple(evaluation))
