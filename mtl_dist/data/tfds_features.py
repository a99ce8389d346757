"""TFDS feature specs as tasks, and the preprocessing of a TFDS input.

A label feature becomes a task: a `ClassLabel` a classification head, a
numeric tensor a regression head. Feature paths (`attributes/Smiling`) reach
into nested features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.data import settings


def parse_task_dataset(task: str, spec: str) -> tuple[str, str]:
  """Splits `tfds:NAME:LABEL` (NAME may carry `/config:version`)."""
  if not spec.startswith(settings.TFDS_PREFIX) or spec.count(":") < 2:
    raise errors.ConfigError(
        f"--task_datasets: {task}={spec} must look like "
        f"{task}=tfds:NAME:LABEL_FEATURE")
  name, label = spec[len(settings.TFDS_PREFIX):].rsplit(":", 1)
  if not name or not label:
    raise errors.ConfigError(
        f"--task_datasets: {task}={spec} must look like "
        f"{task}=tfds:NAME:LABEL_FEATURE")
  return name, label


def task_from_feature(task_name: str, feature: Any) -> tasks_lib.TaskSpec:
  """The TaskSpec a TFDS feature implies.

  Args:
    task_name: The task's name.
    feature: A TFDS FeatureConnector.

  Returns:
    A classification for ClassLabel (its class count) and bool (2 classes),
    a regression (size = number of elements) for integer or float tensors.

  Raises:
    ConfigError: For any other feature (images, text, dicts, variable size).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(feature, tfds.features.ClassLabel):
    return tasks_lib.TaskSpec(task_name, tasks_lib.CLASSIFICATION,
                              num_classes=feature.num_classes)
  if (isinstance(feature, tfds.features.Tensor) and
      not isinstance(feature, (tfds.features.Text, tfds.features.Audio))):
    dtype = tf.as_dtype(feature.tf_dtype)
    shape = tuple(feature.shape)
    if dtype == tf.bool and shape == ():
      return tasks_lib.TaskSpec(task_name, tasks_lib.CLASSIFICATION,
                                num_classes=2)
    if (dtype.is_integer or dtype.is_floating) and None not in shape:
      return tasks_lib.TaskSpec(task_name, tasks_lib.REGRESSION,
                                size=int(np.prod(shape)) if shape else 1)
  raise errors.ConfigError(
      f"feature {task_name!r} ({feature!r}) cannot be a task: use a "
      "ClassLabel, a bool, or an integer or float scalar or vector")


def feature_at(features: Any, path: str, dataset: str) -> Any:
  feature = features
  for part in path.split("/"):
    try:
      feature = feature[part]
    except (KeyError, TypeError):
      raise errors.ConfigError(
          f"dataset {dataset} has no feature {path!r} (top-level features: "
          f"{', '.join(sorted(features.keys()))})") from None
  return feature


def value_at(example: dict[str, Any], path: str) -> tf.Tensor:
  """The value at `path` of a nested example, or of a flat one keyed by path."""
  if path in example:  # Batched parsing returns {"attributes/Smiling": ...}.
    return example[path]
  for part in path.split("/"):
    example = example[part]
  return example


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How raw inputs become model inputs, applied in the input pipeline."""

  input_key: str
  image_size: Optional[tuple[int, int]]
  channels: Optional[int]

  def output_shape(self, feature: Any, dataset: str) -> tuple[int, ...]:
    shape = list(feature.shape)
    if self.image_size is not None:
      if len(shape) != 3:
        raise errors.ConfigError(
            f"--image_size: input {self.input_key!r} of {dataset} has shape "
            f"{tuple(shape)}, not an image")
      shape[0], shape[1] = self.image_size
    if self.channels is not None:
      if len(shape) != 3 or shape[-1] not in (1, 3):
        raise errors.ConfigError(
            f"--channels: input {self.input_key!r} of {dataset} has shape "
            f"{tuple(shape)}, not a 1- or 3-channel image")
      shape[-1] = self.channels
    if None in shape:
      raise errors.ConfigError(
          f"input {self.input_key!r} of {dataset} has variable shape "
          f"{tuple(shape)}: pass --image_size=HEIGHT,WIDTH")
    return tuple(int(d) for d in shape)

  def apply(self, value: tf.Tensor) -> tf.Tensor:
    """Integer images scaled to [0, 1] by their dtype's maximum; others cast."""
    if value.dtype in (tf.uint8, tf.uint16):
      value = tf.cast(value, tf.float32) / float(value.dtype.max)
    else:
      value = tf.cast(value, tf.float32)
    if self.channels is not None and value.shape[-1] != self.channels:
      value = (tf.image.grayscale_to_rgb(value) if self.channels == 3
               else tf.image.rgb_to_grayscale(value))
    if self.image_size is not None:
      value = tf.image.resize(value, self.image_size)
    return value
