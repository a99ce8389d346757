"""State of a weighting or an aggregator: variables every replica agrees on.

A method's state (running means, learned weights, solver warm starts) is
made of variables created in the strategy's scope and checkpointed with
the run. Every replica computes the same global value for them, so the
first replica's is kept (`ONLY_FIRST_REPLICA`), which also lets a replica
step assign them. A step the trainer skips (a loss or gradient not finite)
must leave them unchanged: `assign_if`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf


def state_variable(name: str, shape: Sequence[int],
                   dtype: tf.DType = tf.float32, initial=0) -> tf.Variable:
  """A non-trainable state variable filled with `initial` (default 0)."""
  return tf.Variable(tf.fill(shape, tf.cast(initial, dtype)), trainable=False,
                     name=name,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def inputs_finite(*tensors: Optional[tf.Tensor]) -> tf.Tensor:
  """Whether every given tensor (None ones skipped) is finite."""
  checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors
            if t is not None]
  return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def assign_if(finite: tf.Tensor, variable: tf.Variable,
              value: tf.Tensor) -> None:
  """variable <- value where `finite`, else unchanged (a skipped step)."""
  variable.assign(tf.where(finite, tf.cast(value, variable.dtype),
                           variable.value()))
