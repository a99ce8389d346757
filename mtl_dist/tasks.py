"""Task descriptions: what a head predicts, its loss and its metrics."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple, Union

import tensorflow as tf

from mtl_dist import errors
from mtl_dist import typecheck

# Starts the message of every in-graph data check, so that the driver can
# tell bad data from other errors.
DATA_ERROR_MARK = "mtl_dist data check:"
CLASSIFICATION = "classification"
REGRESSION = "regression"

_DEFAULT_LOSS = {CLASSIFICATION: "crossentropy", REGRESSION: "mse"}
_LOSSES = {CLASSIFICATION: ("crossentropy",), REGRESSION: ("mse", "mae")}
_DEFAULT_METRICS = {CLASSIFICATION: ("accuracy",), REGRESSION: ("mae",)}
_METRICS = {CLASSIFICATION: ("accuracy",), REGRESSION: ("mae", "mse")}
CUSTOM_LOSS = "custom"

# A user loss: (labels, outputs) -> one loss per example, shape [batch].
LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task: a head on the shared trunk.

  Attributes:
    name: The task's name; it keys labels, heads, metrics and checkpoints.
    kind: "classification" (integer labels, logits output) or "regression"
      (float labels of shape [size]).
    num_classes: Class count, for classification.
    size: Output size, for regression.
    loss: "crossentropy" for classification; "mse" or "mae" for regression;
      None picks the kind's default. Or a function `loss(labels, outputs)`
      returning one loss per example, shape [batch], never reduced over the
      batch (the step averages over the global batch). It gets this task's
      labels as int32 class ids of shape [batch] (classification) or
      float32 targets of shape [batch, size] (regression), missing ones
      replaced by 0 with partial labels, and the head's outputs in float32.
    metrics: Evaluation metrics besides the loss; None picks the kind's
      default (accuracy, or mean absolute error).
    weight: The task's loss weight in joint mode.
  """

  name: str
  kind: str
  num_classes: Optional[int] = None
  size: Optional[int] = None
  loss: Union[str, LossFn, None] = None
  metrics: Optional[Tuple[str, ...]] = None
  weight: float = 1.0

  def __post_init__(self):
    typecheck.check_fields(self)
    if not self.name:
      raise errors.ConfigError("TaskSpec.name: give the task a name")
    if self.kind == CLASSIFICATION:
      if not self.num_classes or self.num_classes < 2:
        raise errors.ConfigError(
            f"task {self.name!r}: classification needs num_classes >= 2, "
            f"got {self.num_classes}")
    elif self.kind == REGRESSION:
      if not self.size or self.size < 1:
        raise errors.ConfigError(
            f"task {self.name!r}: regression needs size >= 1, got "
            f"{self.size}")
    else:
      raise errors.ConfigError(
          f"task {self.name!r}: kind must be {CLASSIFICATION!r} or "
          f"{REGRESSION!r}, got {self.kind!r}")
    if callable(self.loss):
      pass
    elif self.loss_name not in _LOSSES[self.kind]:
      raise errors.ConfigError(
          f"task {self.name!r}: loss {self.loss!r} is not one of "
          f"{_LOSSES[self.kind]} for {self.kind}")
    for metric in self.metric_names:
      if metric not in _METRICS[self.kind]:
        raise errors.ConfigError(
            f"task {self.name!r}: metric {metric!r} is not one of "
            f"{_METRICS[self.kind]} for {self.kind}")

  @property
  def output_size(self) -> int:
    """Units of the head's output layer."""
    return self.num_classes if self.kind == CLASSIFICATION else self.size

  @property
  def loss_name(self) -> str:
    """The built-in loss's name, or "custom" for a loss function."""
    if callable(self.loss):
      return CUSTOM_LOSS
    return self.loss or _DEFAULT_LOSS[self.kind]

  @property
  def metric_names(self) -> Tuple[str, ...]:
    return (self.metrics if self.metrics is not None
            else _DEFAULT_METRICS[self.kind])

  def with_weight(self, weight: float) -> "TaskSpec":
    return dataclasses.replace(self, weight=weight)

  @property
  def mask_key(self) -> str:
    """The optional labels entry that marks which examples carry this label."""
    return f"{self.name}_mask"

  def label_mask(self, labels: dict[str, tf.Tensor]) -> tf.Tensor:
    """1.0 for examples that carry this task's label, else 0.0; shape [batch].

    A label is missing when it is a negative class (classification), has a
    NaN component (regression), or `labels["<task>_mask"]` is 0 or False.
    """
    label = labels[self.name]
    if self.kind == CLASSIFICATION:
      present = tf.greater_equal(tf.reshape(label, [-1]), 0)
    else:
      present = tf.reduce_all(tf.math.is_finite(self._as_matrix(label)),
                              axis=-1)
    if self.mask_key in labels:
      present = tf.logical_and(present,
                               tf.cast(labels[self.mask_key], tf.bool))
    return tf.cast(present, tf.float32)

  def fill_missing(self, labels: dict[str, tf.Tensor],
                   mask: tf.Tensor) -> tf.Tensor:
    """This task's labels with missing ones replaced by 0.

    Losses of the replaced entries are multiplied by 0 afterwards; replacing
    them first keeps NaN and out-of-range classes out of every gradient.
    """
    present = tf.cast(mask, tf.bool)
    if self.kind == CLASSIFICATION:
      label = tf.reshape(labels[self.name], [-1])
      return tf.where(present, label, tf.zeros_like(label))
    label = self._as_matrix(labels[self.name])
    return tf.where(present[:, None], label, tf.zeros_like(label))

  def _as_matrix(self, label: tf.Tensor) -> tf.Tensor:
    """Regression labels as float32 [batch, size], whatever their rank.

    Labels of shape [batch] (size 1) would otherwise broadcast against
    outputs of shape [batch, 1] into a [batch, batch] error matrix.
    """
    return tf.reshape(tf.cast(label, tf.float32), [-1, self.size])

  def checked_labels(self, labels: tf.Tensor) -> tf.Tensor:
    """Classification labels as int32 [batch], after an in-graph range check.

    Labels outside [0, output_size) fail the check with an
    InvalidArgumentError naming the task (its message starts with
    `DATA_ERROR_MARK`) instead of turning into NaN (GPU) or an unnamed error
    (CPU). XLA compiles assertions to nothing, so compiled code must check
    its labels before it is called.

    Args:
      labels: This task's class labels, of any shape holding one per example.

    Returns:
      The labels, flattened, available only once the check has passed.
    """
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    message = (f"{DATA_ERROR_MARK} task {self.name!r}: class labels must be "
               f"in [0, {self.output_size}) (missing labels, -1, need "
               "partial labels)")
    # One comparison covers both bounds: as uint32, negative labels are
    # >= 2**31. Four ops per step, where assert_non_negative and assert_less
    # take about 25.
    in_range = tf.reduce_all(
        tf.bitcast(labels, tf.uint32) < tf.constant(self.output_size,
                                                    tf.uint32))
    with tf.control_dependencies(
        [tf.debugging.Assert(in_range, [message, labels], summarize=8)]):
      return tf.identity(labels)

  def per_example_loss(self, labels: tf.Tensor, outputs: tf.Tensor,
                       check: bool = True) -> tf.Tensor:
    """Loss of each example, shape [batch]; no reduction over the batch.

    Args:
      labels: This task's labels.
      outputs: This task's head outputs (logits for classification).
      check: Classification: check the labels' range in-graph (see
        `checked_labels`); False for callers that checked them already.
    """
    if callable(self.loss):
      return self._custom_loss(labels, outputs, check)
    if self.kind == CLASSIFICATION:
      labels = (self.checked_labels(labels) if check else
                tf.reshape(tf.cast(labels, tf.int32), [-1]))
      return tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=labels, logits=outputs)
    return _regression_error(self.loss_name, self._as_matrix(labels), outputs)

  def _custom_loss(self, labels: tf.Tensor, outputs: tf.Tensor,
                   check: bool) -> tf.Tensor:
    """The user's loss function on normalised labels, checked for shape."""
    if self.kind == CLASSIFICATION:
      labels = (self.checked_labels(labels) if check else
                tf.reshape(tf.cast(labels, tf.int32), [-1]))
    else:
      labels = self._as_matrix(labels)
    losses = tf.convert_to_tensor(self.loss(labels, tf.cast(outputs,
                                                           tf.float32)))
    if losses.shape.rank != 1:
      raise errors.ConfigError(
          f"task {self.name!r}: its loss function returned shape "
          f"{losses.shape}; it must return one loss per example, shape "
          "[batch] (do not reduce over the batch)")
    return tf.cast(losses, tf.float32)

  def check_loss(self) -> None:
    """Calls a loss function on a dummy batch of 2 to check what it returns.

    Raises:
      ValueError: If the loss fails or does not return shape [2].
    """
    if not callable(self.loss):
      return
    if self.kind == CLASSIFICATION:
      labels = tf.zeros([2], tf.int32)
    else:
      labels = tf.zeros([2, self.size])
    losses = self.per_example_loss(
        labels, tf.zeros([2, self.output_size]), check=False)
    if losses.shape != (2,):
      raise errors.ConfigError(
          f"task {self.name!r}: its loss function returned shape "
          f"{losses.shape} for a batch of 2; it must return one loss per "
          "example")

  def per_example_metrics(self, labels: tf.Tensor,
                          outputs: tf.Tensor) -> dict[str, tf.Tensor]:
    """Each metric per example, shape [batch]; means are taken by the caller."""
    result = {}
    for metric in self.metric_names:
      if metric == "accuracy":
        predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
        result[metric] = tf.cast(
            tf.equal(predicted, tf.reshape(tf.cast(labels, tf.int32), [-1])),
            tf.float32)
      else:
        result[metric] = _regression_error(metric, self._as_matrix(labels),
                                           outputs)
    return result


def _regression_error(name: str, labels: tf.Tensor,
                      outputs: tf.Tensor) -> tf.Tensor:
  diff = tf.cast(outputs, tf.float32) - tf.cast(labels, tf.float32)
  if name == "mse":
    return tf.reduce_mean(tf.square(diff), axis=-1)
  return tf.reduce_mean(tf.abs(diff), axis=-1)
