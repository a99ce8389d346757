"""`dwa`: dynamic weight average (Liu et al. 2019).

w_k = T exp(r_k / tau) / sum_i exp(r_i / tau), r_k = L_k(t-1) / L_k(t-2),
tau = 2, where L(t-1) and L(t-2) are the mean losses of the last two
complete windows of `--dwa_window` steps (the paper's epochs). Weights are 1
until two windows are complete.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base


@registry.WEIGHTINGS.register
class DWA(base.LossWeighting):
  """DWA over windows of `window` steps, temperature 2."""

  name = "dwa"

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0,
               window: int = 100, temperature: float = 2.0):
    super().__init__(tasks, seed)
    if window < 1:
      raise ValueError(f"dwa_window must be positive, got {window}")
    self._window = window
    self._temperature = temperature
    self.window_sum = base.state_variable("window_sum", [self.num_tasks])
    self.window_steps = base.state_variable("window_steps", [], tf.int64)
    # The means of the last two complete windows, t-1 then t-2.
    self.last_means = base.state_variable("last_means", [2, self.num_tasks])
    self.complete_windows = base.state_variable("complete_windows", [],
                                                tf.int64)

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step, losses
    ratios = self.last_means[0] / tf.maximum(self.last_means[1], 1e-12)
    dynamic = self.num_tasks * tf.nn.softmax(ratios / self._temperature)
    return tf.where(self.complete_windows >= 2, dynamic,
                    tf.ones([self.num_tasks]))

  def update(self, losses: tf.Tensor, applied: tf.Tensor = True,
             updated_losses: Optional[tf.Tensor] = None) -> None:
    del updated_losses
    applied = tf.convert_to_tensor(applied)
    window_sum = self.window_sum + tf.where(applied, losses, 0.0)
    steps = self.window_steps + tf.cast(applied, self.window_steps.dtype)
    complete = steps >= self._window
    mean = window_sum / tf.cast(steps, tf.float32)
    self.last_means.assign(tf.where(
        complete, tf.stack([mean, self.last_means[0]]), self.last_means))
    self.complete_windows.assign_add(tf.cast(complete, tf.int64))
    self.window_sum.assign(tf.where(complete, tf.zeros_like(window_sum),
                                    window_sum))
    self.window_steps.assign(tf.where(complete, tf.constant(0, tf.int64),
                                      steps))
