"""`gradnorm`: GradNorm (Chen et al. 2018), weights that balance gradient norms.

G_i = |grad_W w_i L_i| at the last shared layer W, G = mean_i G_i,
r_i = (L_i(t)/L_i(0)) / mean_j (L_j(t)/L_j(0));
L_grad = sum_i |G_i - sg(G r_i^alpha)|. After each step the weights take an
Adam step on L_grad (d L_grad / d w_i = sign(G_i - target_i) |grad_W L_i|)
and are renormalised to sum to T. Gradients and losses are global
(all-reduced).
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base

_MIN_WEIGHT = 1e-3


def gradnorm_gradient(weights: tf.Tensor, gradient_norms: tf.Tensor,
                      losses: tf.Tensor, initial_losses: tf.Tensor,
                      alpha: float,
                      active: tf.Tensor | None = None) -> tf.Tensor:
  """d L_grad / d w_i = sign(G_i - target_i) |grad_W L_i|.

  Args:
    weights: [T] current weights w_i.
    gradient_norms: [T] |grad_W L_i| of the unweighted losses at the last
      shared layer.
    losses: [T] current losses L_i(t).
    initial_losses: [T] each task's first loss, L_i(0).
    alpha: GradNorm's alpha.
    active: [T] bool, the tasks that take part this step (labelled in this
      global batch, with a recorded L_i(0)); the means run over them and
      the others get a zero gradient. Default: all.

  Returns:
    The [T] gradient of L_grad = sum_i |G_i - sg(mean(G) r_i^alpha)|.
  """
  if active is None:
    active = tf.ones_like(weights, tf.bool)
  share = tf.cast(active, tf.float32)
  count = tf.maximum(tf.reduce_sum(share), 1.0)
  norms = weights * gradient_norms  # G_i
  ratios = share * losses / tf.maximum(initial_losses, 1e-12)
  relative = ratios / tf.maximum(tf.reduce_sum(ratios) / count, 1e-12)
  mean_norm = tf.reduce_sum(share * norms) / count
  target = tf.stop_gradient(mean_norm * relative**alpha)
  return share * tf.sign(norms - target) * gradient_norms


def adam_step(weights: tf.Tensor, gradient: tf.Tensor, first: tf.Tensor,
              second: tf.Tensor, step: tf.Tensor, learning_rate: float,
              beta_1: float = 0.9, beta_2: float = 0.999,
              epsilon: float = 1e-7, active: tf.Tensor | None = None):
  """One Adam update of the weights, then clipped > 0 and renormalised to T.

  The gradient's scale follows each task's loss scale (orders of magnitude
  apart); Adam's per-weight normalisation lets every weight move, as in the
  paper, where the weights train with the network's optimizer.

  Returns:
    (new weights, new first moment, new second moment).
  """
  previous_first, previous_second = first, second
  first = beta_1 * first + (1.0 - beta_1) * gradient
  second = beta_2 * second + (1.0 - beta_2) * gradient * gradient
  t = tf.cast(step, tf.float32)
  corrected_first = first / (1.0 - beta_1**t)
  corrected_second = second / (1.0 - beta_2**t)
  updated = weights - learning_rate * corrected_first / (
      tf.sqrt(corrected_second) + epsilon)
  if active is not None:  # Tasks not taking part keep weight and moments.
    updated = tf.where(active, updated, weights)
    first = tf.where(active, first, previous_first)
    second = tf.where(active, second, previous_second)
  updated = tf.maximum(updated, _MIN_WEIGHT)
  num_tasks = tf.cast(tf.size(weights), tf.float32)
  return updated * num_tasks / tf.reduce_sum(updated), first, second


@registry.WEIGHTINGS.register
class GradNorm(base.LossWeighting):
  """GradNorm's weights, updated from task gradients at the last shared layer."""

  name = "gradnorm"
  needs_task_gradients = True

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0,
               alpha: float = 1.5, lr: float = 0.025):
    super().__init__(tasks, seed)
    self._alpha = alpha
    self._learning_rate = lr
    state = base.state_variable
    self.task_weights = state("task_weights", [self.num_tasks], initial=1)
    self.initial_losses = state("initial_losses", [self.num_tasks])
    self.has_initial_losses = state("has_initial_losses", [self.num_tasks],
                                    tf.bool)
    self.adam_moments = state("adam_moments", [2, self.num_tasks])
    self.updates = state("updates", [], tf.int64)

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step, losses
    return self.task_weights.read_value()

  def replica_update(self, task_gradients: Optional[tf.Tensor],
                     per_task: tf.Tensor, labelled: tf.Tensor,
                     applied: tf.Tensor = True) -> None:
    """GradNorm's weight update.

    A task with no labelled example in the global batch (partial labels)
    takes no part in this step's update, and its L_i(0) is its first
    labelled loss.
    """
    num_tasks = self.num_tasks
    fused = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.concat([tf.reshape(task_gradients, [-1]), per_task,
                   tf.cast(labelled, tf.float32)], axis=0))
    size = int(task_gradients.shape[1])
    gradients = tf.reshape(fused[:num_tasks * size], [num_tasks, size])
    losses = fused[num_tasks * size:num_tasks * (size + 1)]
    present = fused[num_tasks * (size + 1):] > 0
    applied = tf.logical_and(applied, tf.reduce_all(tf.math.is_finite(fused)))
    present = tf.logical_and(present, applied)  # Skipped: nothing changes.
    had_initial = self.has_initial_losses.read_value()
    initial = tf.where(had_initial, self.initial_losses,
                       tf.where(present, losses, 0.0))
    self.initial_losses.assign(initial)
    self.has_initial_losses.assign(tf.logical_or(had_initial, present))
    active = present  # A first labelled step records L_i(0): ratio 1.
    gradient = gradnorm_gradient(self.task_weights, tf.norm(gradients, axis=1),
                                 losses, initial, self._alpha, active)
    weights, first, second = adam_step(
        self.task_weights, gradient, self.adam_moments[0],
        self.adam_moments[1], self.updates + 1, self._learning_rate,
        active=active)
    self.task_weights.assign(tf.where(applied, weights, self.task_weights))
    self.adam_moments.assign(tf.where(applied, tf.stack([first, second]),
                                      self.adam_moments))
    self.updates.assign_add(tf.cast(applied, self.updates.dtype))
