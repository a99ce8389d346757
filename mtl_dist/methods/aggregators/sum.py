"""`sum`: the gradient of the weighted loss sum, one backward pass."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base


@registry.AGGREGATORS.register
class Sum(base.Aggregator):
  """sum_i g_i: what plain multi-task training does.

  The step never forms the Jacobian for it (`needs = SUM`): the optimizer's
  all-reduce sums the gradient of the weighted objective. `__call__` is its
  value on an explicit Jacobian, for the functional API.
  """

  name = "sum"
  promises = frozenset({base.ORDER_INVARIANT, base.HOMOGENEOUS})
  needs = base.SUM

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    del step
    return tf.reduce_sum(jacobian, axis=0)
