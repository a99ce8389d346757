"""`pcgrad`: PCGrad (Yu et al. 2020), gradient surgery in a random order.

For each task i, over the other tasks j in a random order: if g_i . g_j < 0
then g_i -= (g_i . g_j / |g_j|^2) g_j. The update is sum_i g_i. The orders
are drawn from `(seed, step)`, so every replica and worker, and a resumed
run, draws the same ones.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base



def pcgrad(grads: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """PCGrad's update: conflicting components projected out, then summed.

  Args:
    grads: [T, P] per-task gradients.
    seed: int64 [2] seed of the random task orders (e.g. (seed, step)), so
      that every replica and worker draws the same orders.

  Returns:
    The [P] update.
  """
  num_tasks = grads.shape[0]
  squared_norms = tf.reduce_sum(grads * grads, axis=1)
  projected = []
  for i in range(num_tasks):
    others = tf.constant([j for j in range(num_tasks) if j != i], tf.int32)
    order = tf.random.experimental.stateless_shuffle(
        others, seed=tf.stack([seed[0], seed[1] * num_tasks + i]))
    g_i = grads[i]
    for k in range(num_tasks - 1):
      j = order[k]
      g_j = tf.gather(grads, j)
      dot = tf.reduce_sum(g_i * g_j)
      squared_norm = tf.gather(squared_norms, j)
      # A conflict needs g_j != 0; no floor on |g_j|^2, which would break
      # the update's scaling for gradients below ~1e-6.
      coefficient = tf.where(
          tf.logical_and(dot < 0, squared_norm > 0),
          dot / tf.where(squared_norm > 0, squared_norm, 1.0), 0.0)
      g_i = g_i - coefficient * g_j
    projected.append(g_i)
  return tf.add_n(projected)


@registry.AGGREGATORS.register
class PCGrad(base.Aggregator):
  """PCGrad; its sequential projections have no Gram-matrix form."""

  name = "pcgrad"
  promises = frozenset({base.HOMOGENEOUS})

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    return pcgrad(jacobian, self.step_seed(step))
