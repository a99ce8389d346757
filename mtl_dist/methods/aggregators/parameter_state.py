"""Per-parameter state of an aggregator: [T, P] with P learnt at first use.

MoCo and DB-MTL keep a running [T, P] matrix (one row per task, over the P
shared parameters), but an aggregator is created before it sees a Jacobian
and does not know P. Its variable is made in `__init__` (in the strategy's
scope) with the shape [T, None], holding [T, 0] until the first update
assigns a [T, P] value; checkpoints save and restore the [T, P] value.

Two rules keep this correct inside `tf.function` (and `strategy.run`):
- whether the variable holds a value is told by the aggregator's count of
  applied steps, never by the variable's runtime shape: Grappler can take a
  resource variable's shape from an `assign` of a statically [T, P] value
  and constant-fold `tf.size` / `tf.shape` of its reads to it, so a test
  like `tf.size(variable) > 0` became True before the first update (seen
  with TF 2.21; eager calls, as in `mtl_dist.aggregate`, are not affected);
- a skipped (non-finite) step keeps the old value through `tf.cond` rather
  than `tf.where`, as the old value may still be [T, 0].
The variable, like `base.state_variable`'s, keeps the first replica's value
(`ONLY_FIRST_REPLICA`); every replica computes the same one.
"""

from __future__ import annotations

import tensorflow as tf


def parameter_state_variable(name: str, num_tasks: int) -> tf.Variable:
  """A non-trainable [T, None] state variable, [T, 0] until first assigned.

  Args:
    name: The variable's name (its key in the method's state).
    num_tasks: T.

  Returns:
    The variable.
  """
  return tf.Variable(tf.zeros([num_tasks, 0]), trainable=False, name=name,
                     shape=tf.TensorShape([num_tasks, None]),
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def previous(variable: tf.Variable, started: tf.Tensor,
             like: tf.Tensor) -> tf.Tensor:
  """The variable's value once `started`, else zeros shaped like `like`.

  Args:
    variable: A `parameter_state_variable`.
    started: Whether an update has been applied (a count of steps > 0).
    like: The [T, P] Jacobian the value must match.

  Returns:
    A [T, P] tensor with the static shape of `like`.
  """
  value = tf.cond(started, variable.value, lambda: tf.zeros_like(like))
  return tf.ensure_shape(value, like.shape)


def assign_if(finite: tf.Tensor, variable: tf.Variable,
              value: tf.Tensor) -> None:
  """variable <- value where `finite`, else unchanged (even if [T, 0]).

  Args:
    finite: Whether the step's inputs were finite.
    variable: A `parameter_state_variable`.
    value: Its [T, P] new value.
  """
  variable.assign(tf.cond(finite, lambda: value, variable.value))
