"""`upgrad`: UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
Optimization").

Each task gradient g_i is projected onto the dual cone of all the task
gradients (the directions that conflict with none of them), and the
projections are summed with the mean's weights 1/T: the update is
J^T sum_i v_i, v_i solving min v^T G v s.t. v >= e_i / T
(`dual_cone.project_weights`). It never conflicts with a task (up to the
regularisation of G), is invariant to the order of the tasks, scales
linearly with the gradients, and equals the mean when no gradients
conflict. Its weights come from the Gram matrix alone, so it also runs with
`--rep_grad`. The defaults are TorchJD's (norm_eps = reg_eps = 1e-4).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import dual_cone

def upgrad_weights(gram: tf.Tensor, reg_eps: float = dual_cone.REG_EPS
                   ) -> tf.Tensor:
  """UPGrad's [T] coefficients from the [T, T] Gram matrix (float32)."""
  num_tasks = gram.shape[0]
  lower = tf.eye(num_tasks, dtype=tf.float64) / num_tasks
  projected = dual_cone.project_weights(lower, gram, reg_eps=reg_eps)
  return tf.cast(tf.reduce_sum(projected, axis=0), tf.float32)


@registry.AGGREGATORS.register
class UPGrad(dual_cone.DualConeAggregator):
  """UPGrad: the mean of every gradient's projection onto the dual cone."""

  name = "upgrad"
  weights = staticmethod(upgrad_weights)
