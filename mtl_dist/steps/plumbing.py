"""What every train step shares: all-reduce, finite check, update, flattening.

A step's replica function computes its gradients on this replica's data
(compiled with `compiled` under `--jit_compile`), all-reduces them with the
loss shares in one collective (`reduce_and_check`), decides from the
all-reduced values whether everything is finite (the same verdict on every
replica and worker), and applies the update only then (`apply_if`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras


def all_finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """Whether every value of every tensor is finite (a scalar bool).

  NaN and Inf propagate through sums, so this sums each tensor (in float32)
  and checks the total: one pass over the values and two ops per step for
  all of them, where `reduce_all(is_finite(t))` per tensor takes a pass, a
  bool buffer and two ops per tensor. The check also fails if finite values
  sum beyond float32's range (3.4e38), i.e. for gradients of ~1e30 and more,
  which no update survives either.
  """
  sums = [tf.reduce_sum(tf.cast(t.values if isinstance(t, tf.IndexedSlices)
                                else t, tf.float32)) for t in tensors]
  return tf.math.is_finite(tf.add_n(sums))


def reduce_and_check(
    gradients: Sequence[tf.Tensor], losses: tf.Tensor,
    check_gradients: bool = True
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
  """Sums gradients and [T] loss shares over replicas in one all-reduce.

  Args:
    gradients: This replica's gradients.
    losses: This replica's loss shares.
    check_gradients: Whether `finite` covers the gradients too. With loss
      scaling it covers the losses only: overflowing gradients are normal
      there, and the LossScaleOptimizer skips their step itself.

  Returns:
    (gradients, losses, finite): the global sums, and whether all of them are
    finite. Computed from all-reduced values, `finite` is the same on every
    replica and worker, so all of them skip a step together.
  """
  gradients = list(gradients)
  reduced_gradients, reduced_losses = (
      tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, [gradients, losses]))
  checked = [reduced_losses]
  if check_gradients:
    checked += list(reduced_gradients)
  return list(reduced_gradients), reduced_losses, all_finite(checked)


def stacked(scalars: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """The float32 scalars of a dict as one vector, in order ([0] if empty)."""
  if not scalars:
    return tf.zeros([0])
  return tf.stack([tf.cast(value, tf.float32) for value in scalars.values()])


def replica_mean(values: tf.Tensor) -> tf.Tensor:
  """The mean of a vector over all replicas (no collective when empty).

  With equal per-replica batches, the mean of per-replica batch means is
  the global batch's mean.
  """
  if values.shape.num_elements() == 0:
    return values
  return tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.MEAN, values)


def apply_if(optimizer: tf_keras.optimizers.Optimizer,
              gradients: Sequence[tf.Tensor],
              variables: Sequence[tf.Variable],
              apply: Optional[tf.Tensor]) -> None:
  """Applies all-reduced `gradients` if `apply` (None: always), else nothing.

  A skipped step leaves the variables and the optimizer's slots and
  iteration count as they were. `apply` must be equal on every replica. A
  `tf.cond` in replica context cannot hold the optimizer's `merge_call`, so
  the condition is evaluated in cross-replica context, as tf_keras's
  LossScaleOptimizer does.
  """
  variables = list(variables)
  if apply is None:  # Unconditional: no cond, no extra merge_call.
    optimizer.apply_gradients(zip(gradients, variables),
                              skip_gradients_aggregation=True)
    return

  def apply_on_replica(replica_gradients):
    optimizer.apply_gradients(zip(replica_gradients, variables),
                              skip_gradients_aggregation=True)

  def cross_replica(strategy, replica_gradients, replica_apply):
    def update():
      strategy.extended.call_for_each_replica(apply_on_replica,
                                              args=(replica_gradients,))
      return tf.constant(True)

    return tf.cond(strategy.experimental_local_results(replica_apply)[0],
                   update, lambda: tf.constant(False))

  tf.distribute.get_replica_context().merge_call(
      cross_replica, args=(list(gradients), apply))


def compiled(function: Callable, jit_compile: bool) -> Callable:
  """`function` XLA-compiled (traced once per replica device), or as is.

  Only a replica's collective-free forward and backward pass is compiled:
  a jit around `strategy.run` fails under MirroredStrategy, and the
  all-reduce, the finite check and `apply_gradients` stay outside.
  """
  return tf.function(function, jit_compile=True) if jit_compile else function


def first_local(strategy: tf.distribute.Strategy, value) -> tf.Tensor:
  """This worker's first replica's copy of a value equal on all replicas."""
  return strategy.experimental_local_results(value)[0]


def size(variables: Sequence[tf.Variable]) -> int:
  return sum(int(v.shape.num_elements()) for v in variables)


def flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  if not tensors:
    return tf.zeros([0])
  return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(flat: tf.Tensor,
               variables: Sequence[tf.Variable]) -> list[tf.Tensor]:
  pieces, offset = [], 0
  for variable in variables:
    size = int(variable.shape.num_elements())
    pieces.append(tf.reshape(flat[offset:offset + size], variable.shape))
    offset += size
  return pieces


