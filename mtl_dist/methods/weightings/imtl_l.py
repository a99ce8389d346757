"""`imtl_l`: IMTL-L, the loss balance of Liu et al. 2021 ("Towards Impartial
Multi-task Learning").

s_i is learned with the model; the objective is sum_i (e^{s_i} L_i - s_i)
(LibMTL's `IMTL`, its loss-scale part, without the gradient balance
IMTL-G, which is `--aggregator=imtl_g`). Its gradient in s_i is
e^{s_i} L_i - 1, so s_i moves towards -log L_i: every scaled loss towards 1.
The weights are e^{s_i}, s_i = 0 at the start. The total can go negative.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base


def imtl_l_objective(losses: tf.Tensor, scales: tf.Tensor) -> tf.Tensor:
  """sum_i (e^{s_i} L_i - s_i).

  Args:
    losses: [T] task losses L_i.
    scales: [T] log loss scales s_i.

  Returns:
    The scalar objective.
  """
  return tf.reduce_sum(tf.exp(scales) * losses - scales)


@registry.WEIGHTINGS.register
class IMTLL(base.LossWeighting):
  """Weights e^{s_i}, the log scales s_i trained with the model."""

  name = "imtl_l"

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0):
    super().__init__(tasks, seed)
    self.loss_scales = tf.Variable(tf.zeros([self.num_tasks]),
                                   name="loss_scales")

  @property
  def trainable(self) -> list[tf.Variable]:
    return [self.loss_scales]

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step, losses
    return tf.exp(self.loss_scales)

  def objective(self, per_task: tf.Tensor, step: tf.Tensor,
                losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    return (tf.reduce_sum(self.weights(step) * per_task) -
            tf.reduce_sum(self.loss_scales) / replicas)
