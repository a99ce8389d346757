"""`gls`: geometric loss strategy (Chennupati et al. 2019, "MultiNet++").

The objective is the geometric mean of the task losses,
GLS(L) = (prod_i L_i)^(1/T) (LibMTL's `GLS`). Its gradient is
sum_i [GLS(L) / (T L_i)] grad L_i, so the step weighs the losses with

  w_i = GLS(L) / (T L_i) = exp(mean_j log L_j - log L_i) / T,

computed in log space (no product to overflow or underflow) from the
step's global-batch losses (`needs_losses`: all-reduced in the forward
pass, constants of the backward pass). Each replica's objective is
sum_i w_i per_task_i; its sum over replicas, sum_i w_i L_i, has the
gradient of GLS(L) exactly under data parallelism (and its value is
GLS(L)). The `<task>/weight` metric is w_i.

Deviation: each L_i is floored at 1e-8 before the weights are formed, so a
zero (or negative) loss gives large but finite weights. LibMTL has no
guard: a zero loss makes its objective 0 and its gradient non-finite.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base

LOSS_FLOOR = 1e-8


def gls_weights(losses: tf.Tensor) -> tf.Tensor:
  """w_i = (prod_j L_j)^(1/T) / (T L_i), the gradient of the geometric mean.

  Args:
    losses: [T] task losses (floored at `LOSS_FLOOR`).

  Returns:
    [T] float32 weights; sum_i w_i L_i is the geometric mean of the
    (floored) losses and has its gradient.
  """
  log_losses = tf.math.log(tf.maximum(
      tf.cast(losses, tf.float32), LOSS_FLOOR))
  num_tasks = tf.cast(tf.size(log_losses), tf.float32)
  return tf.exp(tf.reduce_mean(log_losses) - log_losses) / num_tasks


@registry.WEIGHTINGS.register
class GLS(base.LossWeighting):
  """Weights GLS(L) / (T L_i): the gradient of the losses' geometric mean."""

  name = "gls"
  needs_losses = True

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step
    return gls_weights(losses)
