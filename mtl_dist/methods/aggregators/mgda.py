"""`mgda`: MGDA (Sener & Koltun 2018), the min-norm point of the gradients.

The update is g_w = sum_i w_i g_i with w minimising |g_w| over the task
simplex: the common descent direction of every task (zero when the origin is
in the hull). w depends only on the Gram matrix, so MGDA also runs from
gradients at the shared representation (`--rep_grad`, MGDA-UB).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base
from mtl_dist.methods.aggregators import simplex


def min_norm_weights(gram: tf.Tensor) -> tf.Tensor:
  """Weights w on the simplex minimising |sum_i w_i g_i| (MGDA's problem).

  Solved by `simplex.simplex_barrier` on |g_w|^2. Tested against enumerating every
  face of the simplex in float64 (tests/test_aggregation.py): the min-norm
  point agrees to 1e-6 |g|max (and 1e-3 of its own norm) for 3 to 10 tasks
  whose norms span 1e-3 to 1e3, and is within 1e-6 |g|max of 0 when 0 is
  in the hull.

  Args:
    gram: [T, T] Gram matrix of the task gradients, G G^T.

  Returns:
    The [T] float32 weights.
  """
  num_tasks = gram.shape[0]
  weights, _ = simplex.simplex_barrier(gram, tf.zeros([num_tasks]), 0.0, True)
  return tf.cast(weights, tf.float32)


def mgda(grads: tf.Tensor) -> tf.Tensor:
  """MGDA's update: the min-norm point of the convex hull of the gradients."""
  return MGDA(grads.shape[0])(grads, tf.constant(0, tf.int64))


@registry.AGGREGATORS.register
class MGDA(base.GramAggregator):
  """MGDA: coefficients `min_norm_weights` of the Gram matrix."""

  name = "mgda"
  promises = frozenset({
      base.ORDER_INVARIANT, base.NON_CONFLICTING, base.HOMOGENEOUS})

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return min_norm_weights(gram)
