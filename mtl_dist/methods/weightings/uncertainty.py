"""`uncertainty`: Kendall et al. 2018, learned homoscedastic uncertainty.

s_i = log sigma_i^2 is learned with the model; the objective is
sum_i c_i exp(-s_i) L_i + s_i / 2 with c_i = 1/2 for regression and 1 for
classification. The total can go negative; that is expected.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base


@registry.WEIGHTINGS.register
class Uncertainty(base.LossWeighting):
  """Weights c_i exp(-s_i), the log-variances s_i trained with the model."""

  name = "uncertainty"

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0):
    super().__init__(tasks, seed)
    self._regression_half = tf.constant(
        [0.5 if task.kind == base.REGRESSION else 1.0 for task in tasks],
        tf.float32)
    self.log_variances = tf.Variable(tf.zeros([self.num_tasks]),
                                     name="log_variances")

  @property
  def trainable(self) -> list[tf.Variable]:
    return [self.log_variances]

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step, losses
    return self._regression_half * tf.exp(-self.log_variances)

  def objective(self, per_task: tf.Tensor, step: tf.Tensor,
                losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    return (tf.reduce_sum(self.weights(step) * per_task) +
            0.5 * tf.reduce_sum(self.log_variances) / replicas)
