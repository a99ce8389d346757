"""Task losses as shares of the global-batch mean, and the label checks.

Every loss is a per-example loss summed and divided by the global batch size
(`average_loss`, what `tf.nn.compute_average_loss(...,
global_batch_size=...)` computes), so the gradients summed over N replicas
equal the gradient of one device with the same global batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist import tasks as tasks_lib
from mtl_dist.model import base as model_base

Batch = tuple[tf.Tensor, dict[str, tf.Tensor]]


def task_losses(tasks: Sequence[tasks_lib.TaskSpec],
                labels: dict[str, tf.Tensor], outputs: dict[str, tf.Tensor],
                global_batch_size: int, partial_labels: bool = False,
                global_counts: Optional[tf.Tensor] = None,
                check_labels: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """This replica's share of each task's loss and of the weighted total.

  Args:
    tasks: The tasks, with their weights.
    labels: Task name to labels (and optionally `<task>_mask` entries).
    outputs: Task name to head outputs.
    global_batch_size: Examples per step over all replicas.
    partial_labels: Whether examples may lack labels (see
      `TaskSpec.label_mask`). Then each task's loss is the sum of its
      per-example losses over labelled examples divided by the number of
      labelled examples in the whole global batch, counted with one
      all-reduce over replicas; a task with no labelled example gets 0.
      Otherwise every example counts and the divisor is the global batch.
    global_counts: Partial labels: the [T] labelled examples of each task in
      the global batch (`global_label_counts`), for callers that cannot
      all-reduce here (compiled code); None counts them here.
    check_labels: Check class labels in-graph (see
      `TaskSpec.checked_labels`); False for labels checked already.

  Returns:
    (total, per_task): total = sum_i weight_i * per_task[i]; per_task is a
    [T] vector of unweighted losses. Summed over replicas they are the
    global-batch means.
  """
  if partial_labels:
    masks = [task.label_mask(labels) for task in tasks]
    if global_counts is None:
      global_counts = global_label_counts(tasks, labels)
    per_task = tf.stack([
        tf.reduce_sum(mask * task.per_example_loss(
            task.fill_missing(labels, mask), outputs[task.name],
            check=check_labels)) / tf.maximum(global_counts[i], 1.0)
        for i, (task, mask) in enumerate(zip(tasks, masks))
    ])
  else:
    per_task = tf.stack([
        average_loss(
            task.per_example_loss(labels[task.name], outputs[task.name],
                                  check=check_labels), global_batch_size)
        for task in tasks
    ])
  weights = tf.constant([task.weight for task in tasks], tf.float32)
  return tf.reduce_sum(weights * per_task), per_task


def sub_batch_losses(tasks: Sequence[tasks_lib.TaskSpec],
                     labels: dict[str, tf.Tensor],
                     outputs: dict[str, tf.Tensor], global_batch_size: int,
                     sub_batches: int, partial_labels: bool = False,
                     global_counts: Optional[tf.Tensor] = None,
                     check_labels: bool = True) -> tf.Tensor:
  """This replica's share of each task's mean loss on each sub-batch.

  Example n of this replica's batch belongs to sub-batch n mod K. A
  replica's batch is a contiguous slice of the global batch, and K divides
  its size, so this is the example's global index mod K on any number of
  replicas (strided sub-batches).

  Args:
    tasks: The tasks.
    labels: Task name to labels (and optionally `<task>_mask` entries).
    outputs: Task name to head outputs.
    global_batch_size: Examples per step over all replicas (K divides it).
    sub_batches: K.
    partial_labels: Whether examples may lack labels; then a sub-batch's
      loss divides by its labelled examples (over all replicas), and is 0
      without any.
    global_counts: Partial labels: the [K, T] labelled examples of each
      task in each global sub-batch (`global_label_counts` with
      `sub_batches`); None counts them here (one all-reduce).
    check_labels: Check class labels in-graph; False for labels checked
      already.

  Returns:
    [K, T]: entry (k, i) is this replica's share of task i's mean
    (unweighted) loss on sub-batch k: the sum of its per-example losses
    there divided by global batch / K (partial labels: by the sub-batch's
    labelled examples). Summed over replicas, each row estimates the
    global-batch losses.
  """
  if partial_labels and global_counts is None:
    global_counts = global_label_counts(tasks, labels, sub_batches)
  columns = []
  for i, task in enumerate(tasks):
    if partial_labels:
      mask = task.label_mask(labels)
      per_example = mask * task.per_example_loss(
          task.fill_missing(labels, mask), outputs[task.name],
          check=check_labels)
    else:
      per_example = task.per_example_loss(labels[task.name],
                                          outputs[task.name],
                                          check=check_labels)
    sums = tf.linalg.matvec(_membership(per_example, sub_batches),
                            per_example, transpose_a=True)
    if partial_labels:
      columns.append(sums / tf.maximum(
          tf.cast(global_counts[:, i], sums.dtype), 1.0))
    else:
      columns.append(tf.math.divide_no_nan(
          sums, tf.constant(global_batch_size / sub_batches, sums.dtype)))
  return tf.stack(columns, axis=1)


def _membership(per_example: tf.Tensor, sub_batches: int) -> tf.Tensor:
  """[batch, K] one-hot sub-batch of each example: its index mod K."""
  return tf.one_hot(tf.range(tf.shape(per_example)[0]) % sub_batches,
                    sub_batches, dtype=per_example.dtype)


def average_loss(per_example_loss: tf.Tensor,
                 global_batch_size: int) -> tf.Tensor:
  """This replica's share of the global-batch mean: sum / global batch size.

  The value of `tf.nn.compute_average_loss(per_example_loss,
  global_batch_size=global_batch_size)` without its three in-graph checks of
  the (here constant) batch size, which cost about 15 ops per task and step.

  Args:
    per_example_loss: Losses, shape [batch].
    global_batch_size: Examples per step over all replicas (positive).

  Returns:
    The scalar share, in the losses' dtype.
  """
  if per_example_loss.shape.rank not in (None, 1):
    raise ValueError(f"per-example losses must have shape [batch], not "
                     f"{per_example_loss.shape}")
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, not "
                     f"{global_batch_size}")
  # div_no_nan, as compute_average_loss: grappler rewrites a division by a
  # constant into a multiplication by its reciprocal, one ulp off.
  return tf.math.divide_no_nan(
      tf.reduce_sum(per_example_loss),
      tf.constant(global_batch_size, per_example_loss.dtype))


def labelled_counts(tasks: Sequence[tasks_lib.TaskSpec], batch: Batch,
                    partial_labels: bool) -> tf.Tensor:
  """[T] this replica's examples that carry each task's label."""
  features, labels = batch
  if partial_labels:
    return tf.stack([tf.reduce_sum(task.label_mask(labels))
                     for task in tasks])
  count = tf.cast(tf.shape(features)[0], tf.float32)
  return tf.fill([len(tasks)], count)


def global_label_counts(tasks: Sequence[tasks_lib.TaskSpec],
                        labels: dict[str, tf.Tensor],
                        sub_batches: int = 1) -> tf.Tensor:
  """Examples labelled for each task in the global batch (all-reduced).

  Returns:
    [T]; with `sub_batches` K > 1, [K, T]: row k counts sub-batch k's
    examples (see `sub_batch_losses`), and the rows sum to the [T] counts.
  """
  if sub_batches == 1:
    local = labelled_counts(tasks, (None, labels), partial_labels=True)
  else:
    local = tf.stack([
        tf.linalg.matvec(_membership(mask, sub_batches), mask,
                         transpose_a=True)
        for mask in (task.label_mask(labels) for task in tasks)], axis=1)
  return tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, local)


def checked_labels(tasks: Sequence[tasks_lib.TaskSpec],
                   labels: dict[str, tf.Tensor],
                   partial_labels: bool) -> dict[str, tf.Tensor]:
  """`labels`, whose class labels are readable only after their range check.

  Train steps check here, before their backward pass, because XLA compiles
  the assertions inside `TaskSpec.per_example_loss` to nothing (see
  `TaskSpec.checked_labels`). With partial labels the check sees what the
  loss would: missing labels replaced by 0.
  """
  checked = dict(labels)
  for task in tasks:
    if task.kind != tasks_lib.CLASSIFICATION:
      continue
    seen = (task.fill_missing(labels, task.label_mask(labels))
            if partial_labels else labels[task.name])
    with tf.control_dependencies([task.checked_labels(seen)]):
      checked[task.name] = tf.identity(labels[task.name])
  return checked


def prepared(tasks: Sequence[tasks_lib.TaskSpec], batch: Batch,
             partial_labels: bool, sub_batches: int = 1
             ) -> tuple[Batch, Optional[tf.Tensor]]:
  """`batch` with checked labels, and the global label counts.

  Returns:
    (batch, counts): counts are the [T] labelled examples of each task in
    the global batch with partial labels (one all-reduce), else None; with
    `sub_batches` K > 1, [K, T] per sub-batch (summed over axis 0: the [T]
    counts).
  """
  features, labels = batch
  labels = checked_labels(tasks, labels, partial_labels)
  counts = (global_label_counts(tasks, labels, sub_batches)
            if partial_labels else None)
  return (features, labels), counts


def regularization(losses: Sequence[tf.Tensor]) -> tf.Tensor:
  """This replica's share of the summed regularization losses."""
  if not losses:
    return tf.constant(0.0)
  return tf.nn.scale_regularization_loss(tf.add_n(losses))


def eval_sums(model: model_base.MultiTaskModel,
              tasks: Sequence[tasks_lib.TaskSpec],
              batch: Batch) -> dict[str, tf.Tensor]:
  """Sums of per-example loss and metrics over one replica's batch.

  Only examples that carry a task's label count for that task.

  Returns:
    `{"<task>/loss": sum, "<task>/<metric>": sum, "<task>/count": labelled
    examples}`; sums rather than means, so that uneven or empty final
    batches on some replicas add up to exact means after the cross-replica
    sum.
  """
  features, labels = batch
  outputs = model(features, training=False, tasks=[t.name for t in tasks])
  sums = {}
  for task in tasks:
    mask = task.label_mask(labels)
    label, output = task.fill_missing(labels, mask), outputs[task.name]
    sums[f"{task.name}/loss"] = tf.reduce_sum(
        mask * task.per_example_loss(label, output))
    for metric, values in task.per_example_metrics(label, output).items():
      sums[f"{task.name}/{metric}"] = tf.reduce_sum(mask * values)
    sums[f"{task.name}/count"] = tf.reduce_sum(mask)
  return sums
