"""`dualproj`: DualProj (TorchJD; Quinton & Rey 2024, "Jacobian Descent for
Multi-Objective Optimization").

The mean of the task gradients projected onto the dual cone of all of them:
the update is J^T v, v solving min v^T G v s.t. v >= 1/T
(`dual_cone.project_weights`). It never conflicts with a task (up to the
regularisation of G) and equals the mean when the mean conflicts with no
task. Its weights come from the Gram matrix alone, so it also runs with
`--rep_grad`. The defaults are TorchJD's (norm_eps = reg_eps = 1e-4).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import dual_cone


def dualproj_weights(gram: tf.Tensor, reg_eps: float = dual_cone.REG_EPS
                     ) -> tf.Tensor:
  """DualProj's [T] coefficients from the [T, T] Gram matrix (float32)."""
  num_tasks = gram.shape[0]
  lower = tf.fill([1, num_tasks], tf.constant(1.0 / num_tasks, tf.float64))
  return tf.cast(dual_cone.project_weights(lower, gram, reg_eps=reg_eps)[0],
                 tf.float32)


@registry.AGGREGATORS.register
class DualProj(dual_cone.DualConeAggregator):
  """DualProj: the mean gradient projected onto the dual cone."""

  name = "dualproj"
  weights = staticmethod(dualproj_weights)
